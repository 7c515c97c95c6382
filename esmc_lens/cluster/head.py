"""Pseudo-label clustering head (paper section 3.2, Algorithm 2), implemented correctly.

1. k-means on the embeddings gives K clusters and centroids.
2. In every k-means cluster, the ``ceil(alpha * n_k)`` members nearest to that cluster's
   OWN centroid (by the k-means assignment, never by ground truth) become pseudo-labelled
   training samples with label k.
3. A 2-layer MLP ``d -> hidden_dim -> K`` is trained on them with cross-entropy for
   ``epochs`` epochs; the model after the LAST epoch is used (no model selection). The
   optimizer is :class:`~esmc_lens.cluster.optim.NeuronAdam` (Adam with one second moment
   per first-layer unit, so that its path does not depend on the input axes), or
   ``optimizer="adam"``, per-weight Adam as in the published code. (The paper names no
   optimizer; the published code runs per-weight Adam, lr 1e-4, for 200 epochs.)
4. Every sample is labelled by the argmax of the head.

``basis="span"`` (the default for more features than samples, e.g. |V| = 49,152-dim
vocabulary vectors of a few hundred images) is the same head computed in n dimensions. The
n training rows span at most n directions; k-means runs on their coordinates in an
orthonormal basis of that span (:class:`SpanBasis`: every distance kept, so the partition
and the pseudo-labels are those of the |V|-dimensional vectors, to fp rounding) and the
MLP's first layer reads the same coordinates: ``W`` on the features and ``P = W Q`` on the
coordinates ``Q^T z`` give the same pre-activations, every gradient of ``W`` lies in the
span (``G = delta^T Z``), and NeuronAdam's step is the same in any orthonormal basis. So
from ``P_0 = W_0 Q`` the two heads follow one path (tested to fp rounding in
``tests/test_head.py``). ``P_0`` is drawn as ``W_0 Q`` is distributed (uncorrelated, of the
variance of ``nn.Linear``'s init for n_features inputs) rather than by drawing the
hidden_dim x n_features matrix and projecting it; the scores of both heads over 10 seeds are
in ``benchmarks/README.md``. Per-weight Adam has no such form (its step depends on the axes),
so ``optimizer="adam"`` always runs on the features.
``basis="features"`` is the paper's head on the raw axes (|V| x 512 weights).

The published code picks pseudo-labels by distance to ``centroids[true_labels]`` and
reports the best epoch judged against the ground truth; both leak labels and are not done
here. ``y`` is accepted by ``fit`` for API compatibility and ignored.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import KMeans
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from ..errors import ConfigError
from .optim import NeuronAdam

__all__ = ["BASES", "OPTIMIZERS", "PseudoLabelHead", "SpanBasis", "check_head_options",
           "select_pseudo_labels"]

BASES = ("auto", "span", "features")
OPTIMIZERS = ("neuron-adam", "adam")

# Rows per forward pass at prediction time: bounds memory for |V| = 32000-dim inputs
# (1024 x 32000 float32 = 131 MB).
_PREDICT_CHUNK = 1024


def _as_float32_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """float32 tensor on ``device``; copies read-only arrays, which torch cannot share."""
    a = np.asarray(a, dtype=np.float32)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def select_pseudo_labels(
    X: np.ndarray, assignment: np.ndarray, centers: np.ndarray, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pick the ``ceil(alpha * n_k)`` members of each cluster nearest to its own centroid.

    Parameters
    ----------
    X : numpy.ndarray, shape (n_samples, n_features)
        Points (in the space k-means ran in).
    assignment : numpy.ndarray of int, shape (n_samples,)
        Cluster index of every point (k-means assignment).
    centers : numpy.ndarray, shape (n_clusters, n_features)
        Cluster centroids.
    alpha : float in (0, 1]
        Fraction of each cluster to keep; at least one point per non-empty cluster.

    Returns
    -------
    indices : numpy.ndarray of int64, shape (n_pseudo,)
        Selected sample indices, grouped by cluster, nearest first within a cluster
        (ties broken by the lower index).
    labels : numpy.ndarray of int64, shape (n_pseudo,)
        Pseudo-label (= cluster index) of each selected sample.
    """
    indices: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for k in range(centers.shape[0]):
        members = np.flatnonzero(assignment == k)
        if members.size == 0:
            continue
        diff = X[members].astype(np.float64) - centers[k].astype(np.float64)
        dist = np.einsum("ij,ij->i", diff, diff)  # squared Euclidean, eq. (5)
        # round() first: 0.3 * 10 is 3.0000000000000004 in floating point and must give 3.
        n_keep = max(1, math.ceil(round(alpha * members.size, 9)))
        order = np.argsort(dist, kind="stable")[:n_keep]
        indices.append(members[order])
        labels.append(np.full(n_keep, k, dtype=np.int64))
    return np.concatenate(indices).astype(np.int64), np.concatenate(labels)


def check_head_options(basis: str, optimizer: str) -> None:
    """Raise ``ConfigError`` (a ``ValueError``) for a basis or optimizer the head lacks, or
    the one pair that is not the same head: per-weight Adam in the span basis."""
    if basis not in BASES:
        raise ConfigError(f"basis must be one of {BASES}, got {basis!r} (--head-basis)")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r} "
                          "(--head-optimizer)")
    if basis == "span" and optimizer == "adam":
        raise ConfigError("basis='span' needs optimizer='neuron-adam': per-weight Adam's path "
                          "depends on the axes, so in the span basis it would not be the same "
                          "head; use basis 'features' (or 'auto') with 'adam'")


def _init_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    """PyTorch's default ``nn.Linear`` init, but drawn from a local generator."""
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(layer.in_features) if layer.in_features > 0 else 0.0
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def _span_init(hidden_dim: int, n_features: int, projection: np.ndarray,
               generator: torch.Generator) -> torch.Tensor:
    """First-layer weights [hidden_dim, rank] on span coordinates, distributed as ``W_0 Q``.

    ``W_0`` (``nn.Linear``'s init for ``n_features`` inputs) has i.i.d. U(+-1/sqrt(n_features))
    entries, variance 1 / (3 n_features); ``Q`` [n_features, rank] has orthonormal columns, so
    ``W_0 Q`` has uncorrelated entries of that variance; each is a sum over the n_features
    weights, Gaussian as far as the central limit holds (not quite where a column of ``Q``
    sits on a few features). They are drawn Gaussian of that variance: hidden_dim x rank
    numbers instead of hidden_dim x n_features and a product. The distribution is the only
    difference between the two heads (``tests/test_head.py`` starts the span head from
    ``W_0 Q`` itself and gets the features head's path).
    """
    std = 1.0 / math.sqrt(3.0 * n_features)
    return torch.randn(hidden_dim, projection.shape[1], generator=generator,
                       dtype=torch.float32) * std


class SpanBasis:
    """An orthonormal basis of the span of the rows of ``Z`` [n, d].

    ``coords`` [n, r] (float64) are the rows in that basis, ``projection`` [d, r] (float32,
    orthonormal columns) maps any row onto it (``Z @ projection == coords`` for the rows it
    was built from, to fp rounding). Distances and inner products of the rows are kept:
    ``coords`` come from the eigendecomposition of the float64 Gram matrix ``Z Z^T``
    (``U sqrt(L)``), directions with eigenvalues below ``n * eps * max`` dropped, so
    ``r <= min(n, d)``. Cost: two float64 products, n x d x n and d x n x r.
    """

    def __init__(self, Z: np.ndarray) -> None:
        Z = np.asarray(Z)
        Z64 = Z.astype(np.float64)
        gram = Z64 @ Z64.T
        lam, U = np.linalg.eigh(gram)
        keep = lam > max(float(lam.max()), 0.0) * Z.shape[0] * np.finfo(np.float64).eps
        lam, U = lam[keep][::-1], U[:, keep][:, ::-1]
        root = np.sqrt(lam)
        self.coords = U * root
        # In float64: a direction of small eigenvalue is divided by its small root, which
        # float32 rounding of the product would not survive.
        self.projection = (Z64.T @ (U / root)).astype(np.float32)
        self.sq_norms = np.einsum("ij,ij->i", self.coords, self.coords)
        self.n_features = Z.shape[1]

    @property
    def rank(self) -> int:
        return self.coords.shape[1]

    def matches(self, Z: np.ndarray, scale: float = 1.0) -> bool:
        """Was this basis built from ``Z * scale``? (shape, row norms, four rows projected;
        ``scale`` saves the caller a scaled copy of ``Z``)"""
        if Z.shape != (self.coords.shape[0], self.n_features):
            return False
        norms = np.einsum("ij,ij->i", Z, Z) * scale**2  # in Z's dtype: a check
        if not np.allclose(norms, self.sq_norms, rtol=1e-4, atol=1e-12):
            return False
        rows = np.linspace(0, Z.shape[0] - 1, min(4, Z.shape[0])).astype(int)
        err = np.abs(self.transform(Z[rows] * scale) - self.coords[rows]).max()
        return bool(err <= 1e-3 * math.sqrt(float(self.sq_norms.max())))

    def transform(self, Z: np.ndarray) -> np.ndarray:
        """Coordinates [m, r] of rows of the feature space (their projection onto the span)."""
        return np.asarray(Z, dtype=np.float32) @ self.projection


class PseudoLabelHead(ClusterMixin, BaseEstimator):
    """k-means + pseudo-label MLP clustering head (ESMC Algorithm 2).

    Parameters
    ----------
    n_clusters : int, default 8
        Number of clusters K (>= 2, <= n_samples).
    alpha : float, default 0.3
        Fraction of each k-means cluster used as pseudo-labels, in (0, 1]. Paper: 0.1-0.4.
    hidden_dim : int, default 512
        Hidden units of the MLP.
    epochs : int, default 100
        Training epochs; the final epoch's model is kept.
    lr : float, default 1e-3
        Learning rate.
    batch_size : int or None, default None
        Minibatch size; None trains full-batch on all pseudo-labelled samples.
    weight_decay : float, default 0.0
        Weight decay: decoupled (AdamW's rule) with "neuron-adam", Adam's L2 term with
        "adam".
    standardize : bool, default False
        Z-score features (statistics over all of ``X`` in ``fit``) before k-means and the
        MLP. Constant features are left centred but unscaled.
    rescale : bool, default True
        Multiply the features by one number, the power of two nearest to 1 / their
        root-mean-square over ``X`` in ``fit`` (after standardising, if that is on), before
        k-means and the MLP. A global scale
        changes neither k-means' partition nor the pseudo-labels, but ``nn.Linear``'s
        default init assumes inputs of unit scale: vocabulary probabilities (~2e-5 per
        entry) leave the MLP untrained after 100 epochs without it (cross-entropy 0.98 on
        the ESMC flower colours, where it falls to 3e-4 with it).
    n_init : int, default 10
        k-means restarts.
    random_state : int, RandomState or None, default None
        Seeds k-means, MLP initialisation and shuffling. Global torch RNG state is untouched.
    device : str, default "cpu"
        Torch device for the MLP.
    basis : "auto", "span" or "features", default "auto"
        Where k-means and the MLP run: "span" in an orthonormal basis of the training
        rows' span (:class:`SpanBasis`; n coordinates instead of n_features: the same
        head, see the module doc), "features" on the raw feature axes (the paper's
        head), "auto" "span" when there are more features than samples and the optimizer
        is "neuron-adam".
    optimizer : "neuron-adam" or "adam", default "neuron-adam"
        :class:`~esmc_lens.cluster.optim.NeuronAdam` (one second moment per first-layer
        unit: the same path in any basis), or per-weight :class:`torch.optim.Adam` (the
        published code's; its path depends on the axes, so it runs on the features only).

    Attributes
    ----------
    labels_ : numpy.ndarray of int64, shape (n_samples,)
        Head argmax for every training sample.
    kmeans_labels_ : numpy.ndarray of int64, shape (n_samples,)
        k-means assignment.
    cluster_centers_ : numpy.ndarray, shape (n_clusters, n_features)
        k-means centroids, in the space the head sees (standardised if ``standardize``,
        times ``input_scale_``).
    pseudo_indices_ : numpy.ndarray of int64, shape (n_pseudo,)
        Indices of the pseudo-labelled samples.
    pseudo_labels_ : numpy.ndarray of int64, shape (n_pseudo,)
        Their pseudo-labels (k-means cluster).
    loss_curve_ : list of float, length epochs
        Mean training cross-entropy of each epoch.
    n_features_in_ : int
        Input dimension.
    head_ : torch.nn.Sequential
        Trained MLP ``Linear(d, hidden_dim), ReLU, Linear(hidden_dim, K)`` (float32, eval).
    mean_, scale_ : numpy.ndarray, shape (n_features,)
        Standardisation statistics (only if ``standardize``).
    input_scale_ : float
        The factor applied to the (standardised) features: ~1 / RMS, a power of two, if
        ``rescale``, else 1.
    span_ : SpanBasis
        The basis k-means and the MLP ran in (only with ``basis="span"``, or "auto"
        choosing it): the MLP reads ``span_.transform(Z)``.
    """

    def __init__(
        self,
        n_clusters: int = 8,
        alpha: float = 0.3,
        hidden_dim: int = 512,
        epochs: int = 100,
        lr: float = 1e-3,
        batch_size: int | None = None,
        weight_decay: float = 0.0,
        standardize: bool = False,
        rescale: bool = True,
        n_init: int = 10,
        random_state: int | np.random.RandomState | None = None,
        device: str = "cpu",
        basis: str = "auto",
        optimizer: str = "neuron-adam",
    ) -> None:
        self.n_clusters = n_clusters
        self.alpha = alpha
        self.hidden_dim = hidden_dim
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.standardize = standardize
        self.rescale = rescale
        self.n_init = n_init
        self.random_state = random_state
        self.device = device
        self.basis = basis
        self.optimizer = optimizer

    def _check_params(self, n_samples: int) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        if not is_int(self.n_clusters) or self.n_clusters < 2:
            raise ValueError(f"n_clusters must be an int >= 2, got {self.n_clusters!r}")
        if self.n_clusters > n_samples:
            raise ValueError(
                f"n_clusters={self.n_clusters} must be <= n_samples={n_samples}; "
                "pass more samples or fewer clusters"
            )
        alpha = self.alpha
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float, np.integer, np.floating))
            or not 0.0 < float(alpha) <= 1.0
        ):
            raise ValueError(f"alpha must be a number in (0, 1], got alpha={alpha!r}")
        for name in ("hidden_dim", "epochs", "n_init"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.batch_size is not None and (not is_int(self.batch_size) or self.batch_size < 1):
            raise ValueError(f"batch_size must be None or an int >= 1, got {self.batch_size!r}")
        if not float(self.lr) > 0.0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not float(self.weight_decay) >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        check_head_options(self.basis, self.optimizer)

    def _transform(self, X: np.ndarray) -> np.ndarray:
        if self.standardize:
            X = (X - self.mean_) / self.scale_
        return X * np.asarray(self.input_scale_, dtype=X.dtype)

    def fit(self, X: ArrayLike, y: object = None, span: SpanBasis | None = None
            ) -> PseudoLabelHead:
        """Run k-means, select pseudo-labels and train the head.

        Parameters
        ----------
        X : array-like, shape (n_samples, n_features)
            Embeddings; finite values only.
        y : ignored
            Accepted for scikit-learn API compatibility; never used.
        span : SpanBasis, optional
            The ``span_`` of an earlier fit on the same ``X`` with the same ``standardize``
            and ``rescale`` (it depends on nothing else), to skip recomputing it when
            fitting several seeds; checked against ``X``.

        Returns
        -------
        PseudoLabelHead
            self, fitted.
        """
        X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2)
        n_samples = X.shape[0]
        self._check_params(n_samples)
        rng = check_random_state(self.random_state)
        kmeans_seed = int(rng.randint(np.iinfo(np.int32).max))
        torch_seed = int(rng.randint(np.iinfo(np.int32).max))

        if self.standardize:
            self.mean_ = X.mean(axis=0)
            scale = X.std(axis=0)
            self.scale_ = np.where(scale > 0, scale, 1.0).astype(X.dtype)
        else:  # drop statistics of an earlier standardized fit
            for name in ("mean_", "scale_"):
                self.__dict__.pop(name, None)
        Z = (X - self.mean_) / self.scale_ if self.standardize else X  # [n, d], no copy
        self.input_scale_ = 1.0
        if self.rescale:
            rms = math.sqrt(float(np.einsum("ij,ij->", Z, Z, dtype=np.float64)) / Z.size)
            # A power of two: scaling is then exact in floating point, so k-means and the
            # pseudo-labels are bit for bit those of the unscaled features.
            self.input_scale_ = 2.0 ** -round(math.log2(rms)) if rms > 0 else 1.0
        scale = np.asarray(self.input_scale_, dtype=Z.dtype)

        self.__dict__.pop("span_", None)
        if self.basis == "span" or (self.basis == "auto" and self.optimizer == "neuron-adam"
                                    and Z.shape[1] > n_samples):
            if span is not None and not span.matches(Z, float(scale)):
                raise ValueError("span= was built from other features: pass the span_ of a "
                                 "fit on the same X (same standardize and rescale), or None")
            # Every later step reads the span coordinates only: no scaled |V|-wide copy.
            self.span_ = span if span is not None else SpanBasis(Z * scale)
            Z = self.span_.coords
        else:
            Z = Z * scale

        km = KMeans(n_clusters=self.n_clusters, n_init=self.n_init, random_state=kmeans_seed)
        assignment = km.fit_predict(Z).astype(np.int64)
        self.kmeans_labels_ = assignment
        # Back from span coordinates in the features' float32 (as k-means on float32 features
        # would give them), not a float64 copy of the |V| x n projection.
        self.cluster_centers_ = (km.cluster_centers_ if not hasattr(self, "span_") else
                                 km.cluster_centers_.astype(np.float32)
                                 @ self.span_.projection.T)
        self.pseudo_indices_, self.pseudo_labels_ = select_pseudo_labels(
            Z, assignment, km.cluster_centers_, float(self.alpha)
        )

        device = torch.device(self.device)
        # Two streams: the first layer's weights, and everything else (its bias, the second
        # layer, the shuffling). The span head draws its weights differently (module doc);
        # the rest of a fit is then the same draws in both bases.
        weight_gen = torch.Generator(device="cpu").manual_seed(torch_seed)
        generator = torch.Generator(device="cpu").manual_seed(
            int(rng.randint(np.iinfo(np.int32).max)))
        # nn.Linear's constructor draws its default init from the global RNG; fork it so
        # the caller's RNG stream is untouched, then re-draw from the local generators.
        with torch.random.fork_rng(devices=[]):
            head = nn.Sequential(
                nn.Linear(Z.shape[1], self.hidden_dim),
                nn.ReLU(),
                nn.Linear(self.hidden_dim, self.n_clusters),
            )
        bound = 1.0 / math.sqrt(X.shape[1])  # nn.Linear's bias init for n_features inputs
        with torch.no_grad():
            if hasattr(self, "span_"):
                head[0].weight.copy_(_span_init(self.hidden_dim, X.shape[1],
                                                self.span_.projection, weight_gen))
            else:
                nn.init.kaiming_uniform_(head[0].weight, a=math.sqrt(5), generator=weight_gen)
            nn.init.uniform_(head[0].bias, -bound, bound, generator=generator)
        _init_linear(head[2], generator)
        head = head.to(device=device, dtype=torch.float32)

        inputs = _as_float32_tensor(Z[self.pseudo_indices_], device)
        targets = torch.as_tensor(self.pseudo_labels_, dtype=torch.long, device=device)
        n_train = inputs.shape[0]
        batch = n_train if self.batch_size is None else min(int(self.batch_size), n_train)
        if self.optimizer == "adam":
            # The fused kernel halves the step time on CPU (the update of the |V| x 512 first
            # layer is memory bound); same arithmetic as the default implementation.
            optimizer = torch.optim.Adam(
                head.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay),
                fused=device.type in ("cpu", "cuda"),
            )
        else:
            optimizer = NeuronAdam(
                [{"params": [head[0].weight]},
                 {"params": [head[0].bias, *head[2].parameters()], "pooled": False}],
                lr=float(self.lr), weight_decay=float(self.weight_decay))
        loss_fn = nn.CrossEntropyLoss()
        self.loss_curve_ = []
        head.train()
        # The first layer's gradients (|V| x hidden_dim, 100 MB for |V| = 49152) are written
        # into buffers allocated once: letting autograd allocate them afresh every step
        # costs more in page faults than the matmul itself on the CPU. Same kernels as
        # autograd's (grad_W = grad_out^T @ x, grad_b = grad_out.sum(0)): bit-identical.
        first, rest = head[0], head[1:]
        grad_w = torch.empty_like(first.weight)
        grad_b = torch.empty_like(first.bias)
        for _ in range(int(self.epochs)):
            # Shuffling draws from the local generator (on CPU) so runs are reproducible.
            order = torch.randperm(n_train, generator=generator).to(device)
            total = 0.0
            for start in range(0, n_train, batch):
                idx = order[start : start + batch]
                optimizer.zero_grad(set_to_none=True)
                x = inputs[idx]
                with torch.no_grad():
                    pre = first(x)
                pre.requires_grad_(True)
                loss = loss_fn(rest(pre), targets[idx])
                loss.backward()
                torch.mm(pre.grad.t(), x, out=grad_w)
                torch.sum(pre.grad, dim=0, out=grad_b)
                first.weight.grad, first.bias.grad = grad_w, grad_b
                optimizer.step()
                total += float(loss.detach()) * idx.shape[0]
            self.loss_curve_.append(total / n_train)
        head.eval()
        self.head_ = head
        self.n_iter_ = int(self.epochs)
        self.labels_ = self._logits(Z).argmax(axis=1).astype(np.int64)
        return self

    def _head_input(self, X: np.ndarray) -> np.ndarray:
        """What the MLP reads for raw rows ``X``: the transformed features, or their span
        coordinates (a row's part outside the training span is dropped: in the paper's
        head it meets only the untrained initial weights)."""
        Z = self._transform(X)
        return self.span_.transform(Z) if hasattr(self, "span_") else Z

    def _logits(self, Z: np.ndarray) -> np.ndarray:
        """Head outputs for already-transformed inputs, shape (n, n_clusters), float32."""
        device = next(self.head_.parameters()).device
        out = []
        with torch.no_grad():
            for start in range(0, Z.shape[0], _PREDICT_CHUNK):
                chunk = _as_float32_tensor(Z[start : start + _PREDICT_CHUNK], device)
                out.append(self.head_(chunk).cpu().numpy())
        return np.concatenate(out, axis=0)

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Cluster index of each sample (argmax of the head).

        Parameters
        ----------
        X : array-like, shape (n_samples, n_features)

        Returns
        -------
        numpy.ndarray of int64, shape (n_samples,)
        """
        check_is_fitted(self, "head_")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return self._logits(self._head_input(X)).argmax(axis=1).astype(np.int64)

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Softmax of the head's outputs.

        Parameters
        ----------
        X : array-like, shape (n_samples, n_features)

        Returns
        -------
        numpy.ndarray of float64, shape (n_samples, n_clusters)
            Rows sum to 1.
        """
        check_is_fitted(self, "head_")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return softmax(self._logits(self._head_input(X)).astype(np.float64), axis=1)

    def fit_predict(self, X: ArrayLike, y: object = None) -> np.ndarray:
        """Fit and return ``labels_``.

        Parameters
        ----------
        X : array-like, shape (n_samples, n_features)
        y : ignored

        Returns
        -------
        numpy.ndarray of int64, shape (n_samples,)
        """
        return self.fit(X, y).labels_
