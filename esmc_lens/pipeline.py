"""ESMC end to end: images -> capture -> lens -> localize -> cluster -> report.

>>> vlm = load_model("offline")                                            # doctest: +SKIP
>>> ds = load_dataset("../shared/data/esmc/flower")                         # doctest: +SKIP
>>> res = run_esmc(vlm, ds, "The color of the flower is", criterion="color")  # doctest: +SKIP
>>> res.scores                 # ESMC and its baselines, mean ± std over seeds  # doctest: +SKIP
>>> res.clusters               # each cluster named by the lens                  # doctest: +SKIP
>>> res.save("outputs/flower-color")                                        # doctest: +SKIP

Two passes over the model, as the paper's section 3.1 intends:

1. *localization*: ``n_samples`` sampled images are captured at every layer and prompt
   position with the keywords' lens probabilities (Algorithm 1 picks the target cells);
2. *embedding*: every image is captured only at the target layer(s) and position(s) (the
   trace stops after the deepest target layer), plus the vision encoder's pooled feature for
   the vision-only baseline.

The target embedding (``space``: lens probabilities, ``"probs"``, by default: the paper's
vocabulary space, |V| dimensions, "after applying the softmax function to embedding
logits" as its section 4.3 reads; ``"logits"`` and ``"hidden"`` are available) is
clustered by :class:`~esmc_lens.head.PseudoLabelHead` (Algorithm 2). Scores of every method
are the mean and std over ``n_seeds`` seeds; ``labels`` are those of ``seed``.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .backend import VLM
from .baselines import head_scores, kmeans_scores, output_baseline, score_table, vision_baseline
from .capture import ImageSource, capture
from .errors import ConfigError, EsmcWarning
from .keywords import Keywords, class_name_keywords, default_question, lm_keywords, user_keywords
from .lens import Unembed, keyword_token_ids
from .localize import Localization, localize
from .naming import name_clusters, naming_accuracy
from .targets import target_embeddings, target_labels
from .validate import check_finite, check_run, keyword_notes

_PROMPT_RE = re.compile(r"(?:the\s+)?(\w+)\s+of\s+(?:the|this|a|an)\s+(\w+)", re.IGNORECASE)


def question_for_prompt(prompt: str) -> str | None:
    """The keyword question for a criterion prompt ("The color of the flower is" ->
    "What are common colors of flowers? ..."), or None when the prompt has no
    "<criterion> of the <object>" phrase."""
    m = _PROMPT_RE.search(prompt)
    return default_question(m.group(1).lower(), m.group(2).lower()) if m else None


@dataclass
class EsmcResult:
    """Everything one ESMC run produced (see :func:`run_esmc`)."""

    model: str
    criterion: str | None
    prompt: str
    image_ids: list[str]
    labels: np.ndarray  # [n_images] cluster of each image (seed ``seed``)
    clusters: pd.DataFrame  # one row per cluster: name, size, top tokens, purity
    scores: pd.DataFrame  # method x metric mean/std (empty without labels)
    per_seed: dict[str, pd.DataFrame]  # method -> per-seed scores
    target: list[tuple[int, int]]  # (stream index, slot)
    target_labels: list[str]
    space: str
    keywords: Keywords
    localization: Localization
    y_true: np.ndarray | None = None
    class_names: list[str] | None = None
    answers: list[str] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def assignments(self) -> pd.DataFrame:
        """image, cluster, cluster name and (when known) true label, one row per image."""
        names = dict(zip(self.clusters["cluster"], self.clusters["name"], strict=True))
        df = pd.DataFrame({"image": self.image_ids, "cluster": self.labels,
                           "cluster_name": [names.get(c, "") for c in self.labels]})
        if self.y_true is not None and self.class_names is not None:
            df["true_label"] = [self.class_names[y] if y >= 0 else "" for y in self.y_true]
        return df

    def to_json(self) -> dict:
        def block(method: str) -> dict:
            row = self.scores.loc[method]
            return {m: float(row[f"{m}_mean"]) for m in ("nmi", "ri", "ari", "acc")} | {
                f"{m}_std": float(row[f"{m}_std"]) for m in ("nmi", "ri", "ari", "acc")}

        has = not self.scores.empty
        return {
            "model": self.model, "criterion": self.criterion, "prompt": self.prompt,
            "n_images": self.n_images, "target": [list(t) for t in self.target],
            "target_labels": self.target_labels, "space": self.space,
            "scores": block("ESMC") if has else None,
            "baselines": {m: block(m) for m in self.scores.index if m != "ESMC"} if has else {},
            "clusters": json.loads(self.clusters.to_json(orient="records")),
            "naming_accuracy": (naming_accuracy(self.clusters)
                                if "majority_label" in self.clusters else None),
            "keywords": self.keywords.to_frame().to_dict(orient="records"),
            "localization": {"max_votes": int(self.localization.max_votes),
                             "n_pairs": int(self.localization.n_pairs),
                             "tau": self.localization.tau,
                             "sample": list(self.image_ids[i] for i in self.settings.get(
                                 "localization_sample", [])),
                             "message": self.localization.message},
            "timings_s": self.timings, "settings": self.settings, "meta": self.meta,
        }

    def save(self, outdir: str | Path) -> Path:
        """``results.json``, ``assignments.csv``, ``scores.csv``, ``votes.csv``, per-seed
        scores, and ``result.pkl`` (the whole object, for :meth:`load`)."""
        import os
        import pickle

        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "result.pkl.part"
        tmp.write_bytes(pickle.dumps(self))
        os.replace(tmp, out / "result.pkl")
        (out / "results.json").write_text(json.dumps(self.to_json(), indent=1, default=str))
        self.assignments().to_csv(out / "assignments.csv", index=False)
        self.scores.to_csv(out / "scores.csv")
        self.localization.votes.to_csv(out / "votes.csv")
        for method, df in self.per_seed.items():
            df.to_csv(out / f"per_seed_{re.sub(r'[^A-Za-z0-9]+', '_', method)}.csv")
        return out

    @classmethod
    def load(cls, outdir: str | Path) -> EsmcResult:
        """The result saved by :meth:`save` (a pickle: load only folders you trust)."""
        import pickle

        obj = pickle.loads((Path(outdir) / "result.pkl").read_bytes())
        if not isinstance(obj, cls):
            raise ConfigError(f"{outdir}/result.pkl does not hold an EsmcResult")
        return obj

    @staticmethod
    def load_json(outdir: str | Path) -> dict:
        """The saved ``results.json`` of a run (plain data)."""
        return json.loads((Path(outdir) / "results.json").read_text())


def _labels_for(images, criterion: str | None, y_true, class_names):
    from .data import ImageDataset

    if y_true is not None:
        return np.asarray(y_true), class_names
    if isinstance(images, ImageDataset) and criterion is not None:
        if criterion not in images.criteria:
            raise ConfigError(f"criterion {criterion!r} is not in {images.root}; its criteria "
                              f"are {images.criteria}")
        return images.y(criterion), list(images.classes[criterion])
    return None, class_names


def choose_keywords(vlm: VLM, prompt: str, keywords=None, images=None,
                    criterion: str | None = None, source: str = "auto") -> Keywords:
    """Keywords for localization: the user's, the local LM's, or the class names.

    ``source="auto"``: the user's list if given, else the LM's answer to the question built
    from the prompt, falling back to the dataset's class names.
    """
    if keywords is not None and source in ("auto", "user"):
        return keywords if isinstance(keywords, Keywords) else user_keywords(keywords)
    if source in ("auto", "lm"):
        q = question_for_prompt(prompt)
        if q is not None:
            kw = lm_keywords(vlm, q)
            if len(kw.words) >= 2 or source == "lm":
                return kw
    if source in ("auto", "class_names") and criterion is not None:
        return class_name_keywords(images, criterion)
    raise ConfigError(f"no keywords for prompt {prompt!r}: pass keywords=[...] (e.g. "
                      "--keywords red,white,pink) or a dataset criterion with class names")


def capture_fn(cache_dir: str | Path | None):
    """:func:`~esmc_lens.capture.capture`, or its disk-cached form when ``cache_dir`` is set."""
    if cache_dir is None:
        return capture
    from .store import cached_capture

    return partial(cached_capture, cache_dir=cache_dir)


def capture_target_cells(vlm: VLM, images, prompt: str, positions: list[int],
                         layers: list[int], *, cache_dir: str | Path | None = None,
                         batch_size: int = 8, vision: bool = True, progress: bool = True):
    """Every image at the target cells only: :func:`run_esmc`'s second capture.

    ``positions`` are sequence positions, ``layers`` stream indices; states are kept in fp32.
    Anything that recaptures a run's targets (e.g. :func:`esmc_lens.diagnose.readout_for_run`)
    goes through here, so with the run's ``cache_dir`` its batches are read back, not
    recomputed.
    """
    return capture_fn(cache_dir)(vlm, images, prompt, positions=positions, layers=layers,
                                 batch_size=batch_size, vision=vision,
                                 store_dtype=torch.float32, progress=progress)


def run_esmc(
    vlm: VLM,
    images,
    prompt: str,
    *,
    n_clusters: int | None = None,
    criterion: str | None = None,
    y_true=None,
    class_names: list[str] | None = None,
    keywords=None,
    keyword_source: str = "auto",
    alpha: float = 0.3,
    tau: float = 0.2,
    n_samples: int = 10,
    space: str = "probs",
    seed: int = 0,
    n_seeds: int = 10,
    epochs: int = 100,
    head_lr: float = 1e-3,
    baselines: bool = True,
    batch_size: int = 8,
    answer_tokens: int = 8,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> EsmcResult:
    """Run ESMC on ``images`` for the criterion ``prompt`` (see the module docstring).

    ``images``: an :class:`~esmc_lens.data.ImageDataset` (labels from ``criterion``),
    PIL images or paths (labels from ``y_true`` if any). ``n_clusters`` defaults to the
    number of classes when labels exist. ``cache_dir``: keep both captures on disk there
    (:func:`~esmc_lens.store.cached_capture`), so an interrupted run resumes.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    source = ImageSource.of(images)
    check_run(vlm, images, prompt, criterion=criterion, n_images=source.n, n_clusters=n_clusters,
              alpha=alpha, tau=tau, n_samples=n_samples, batch_size=batch_size,
              n_seeds=n_seeds, epochs=epochs)
    y, class_names = _labels_for(images, criterion, y_true, class_names)
    if n_clusters is None:
        if y is None or class_names is None:
            raise ConfigError("n_clusters is needed when the images have no labels "
                              "(--k K)")
        n_clusters = len(class_names)
    if not 2 <= n_clusters <= source.n:
        raise ConfigError(f"n_clusters={n_clusters}: need 2 <= k <= {source.n} (the number "
                          "of images)")
    if not 0 < alpha <= 1:
        raise ConfigError(f"alpha={alpha}: the pseudo-label ratio must be in (0, 1]")
    kw = choose_keywords(vlm, prompt, keywords, images, criterion, keyword_source)
    for note in keyword_notes(vlm.tokenizer, kw.words):
        warnings.warn(note, EsmcWarning, stacklevel=2)
    cap = capture_fn(cache_dir)
    timings["keywords"] = time.perf_counter() - t

    # 1. localization on sampled images: every layer, every prompt position.
    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(source.n, size=min(n_samples, source.n), replace=False))
    sample_imgs = [source.load(int(i)) for i in sample]
    loc_cache = cap(vlm, sample_imgs, prompt, keywords=kw.words, batch_size=batch_size,
                    image_ids=[source.ids[i] for i in sample], progress=progress)
    check_finite(loc_cache.keyword_probs.reshape(len(loc_cache), -1).numpy(),
                 loc_cache.image_ids, "lens keyword probabilities")
    loc = localize(loc_cache, tau=tau, n_samples=len(sample), seed=seed)
    if not loc.found:
        warnings.warn(loc.message, EsmcWarning, stacklevel=2)
    timings["localize"] = time.perf_counter() - t

    # 2. every image at the target cells only.
    t = time.perf_counter()
    seq = sorted({int(loc_cache.positions[0, p]) for _, p in loc.targets})
    cache = capture_target_cells(vlm, images, prompt, seq, sorted({s for s, _ in loc.targets}),
                                 cache_dir=cache_dir, batch_size=batch_size, vision=baselines,
                                 progress=progress)
    targets = [(s, seq.index(int(loc_cache.positions[0, p]))) for s, p in loc.targets]
    unembed = Unembed.from_model(vlm)
    X = target_embeddings(cache, targets, space=space, unembed=unembed)
    check_finite(X, cache.image_ids, "target embeddings")
    timings["capture"] = time.perf_counter() - t

    # 3. cluster: the reported labels are seed ``seed``; scores are over n_seeds seeds.
    t = time.perf_counter()
    seeds = list(range(seed, seed + n_seeds))
    per_seed: dict[str, pd.DataFrame] = {}
    y_eval = y if y is not None else np.zeros(source.n, dtype=int)
    esmc_df, esmc_labels = head_scores(X, y_eval, n_clusters, alpha, seeds=seeds,
                                       return_labels=True, epochs=epochs, lr=head_lr)
    labels = np.asarray(esmc_labels[0])
    per_seed["ESMC"] = esmc_df
    timings["cluster"] = time.perf_counter() - t

    answers = None
    if baselines and y is not None:
        t = time.perf_counter()
        per_seed["ESMC w/o head"] = kmeans_scores(X, y, n_clusters, seeds=seeds)
        answers = []
        for s in range(0, source.n, batch_size):
            batch = [source.load(i) for i in range(s, min(s + batch_size, source.n))]
            answers.extend(vlm.generate(batch, prompt, max_new_tokens=answer_tokens))
        per_seed["Output"] = output_baseline(answers, y, n_clusters, seeds=seeds)
        per_seed["Vision only"] = vision_baseline(cache.vision.numpy(), y, n_clusters,
                                                  seeds=seeds)
        timings["baselines"] = time.perf_counter() - t
    scores = score_table(per_seed) if y is not None else pd.DataFrame()

    # 4. explain: name each cluster by the lens of its mean vocabulary-space vector.
    vocab = X if space != "hidden" else target_embeddings(cache, targets, "logits", unembed)
    if len(targets) > 1:  # name by the first target's vocabulary block
        vocab = vocab[:, : unembed.vocab_size]
    clusters = name_clusters(vocab, labels, vlm.tokenizer, keywords=kw.words,
                             keyword_groups=keyword_token_ids(vlm.tokenizer, kw.words),
                             y_true=y, class_names=class_names)
    return EsmcResult(
        model=vlm.name, criterion=criterion, prompt=prompt, image_ids=list(cache.image_ids),
        labels=labels, clusters=clusters, scores=scores, per_seed=per_seed,
        target=[tuple(x) for x in loc.targets],
        target_labels=target_labels(loc_cache, loc.targets), space=space, keywords=kw,
        localization=loc, y_true=y, class_names=class_names, answers=answers,
        timings=timings,
        settings={"n_clusters": n_clusters, "alpha": alpha, "tau": tau,
                  "n_samples": n_samples, "seed": seed, "n_seeds": n_seeds,
                  "epochs": epochs, "head_lr": head_lr, "space": space,
                  "keyword_source": keyword_source,
                  # dataset indices of the images Algorithm 1 sampled
                  "localization_sample": [int(sample[i]) for i in loc.sample]},
        meta={k: v for k, v in cache.meta.items() if k != "chat_template"},
    )
