"""Interactive explorers (ipywidgets) of a capture, its votes and its clusters.

* :class:`LensExplorer` — pick an image, a layer (slider), a prompt position (labelled by its
  token) and type a keyword: the image, the layer x position heatmap of the keyword's lens
  probability (selected cell outlined) and the top-k lens tokens of the selected cell.
* :class:`VoteMapExplorer` — keywords and tau change Algorithm 1's vote table live
  (:func:`esmc_lens.localization.votes.vote_table`); the winning cells are listed.
* :class:`ClusterBrowser` — thumbnails per cluster with the cluster's name and lens tokens.

Every explorer keeps what it shows as plain attributes (``heatmap``, ``top_tokens``,
``votes``, ``targets``, ``rows``, ...) updated on each change, so its logic is tested by
setting widget values and reading them back; ``.widget`` is the ipywidgets box to display
(a notebook displays the explorer itself).

>>> ex = LensExplorer(cache, vlm, images=ds, keyword="red")        # doctest: +SKIP
>>> ex                           # in a notebook: the controls and views  # doctest: +SKIP
>>> ex.layer.value = 20; ex.top_tokens                               # doctest: +SKIP
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import ConfigError
from ..lens.keyword_rule import keyword_token_ids
from ..lens.readout import keyword_probs, top_k
from ..lens.tokens import decode_each, token_strings
from ..lens.unembed import Unembed
from ..localization.grid import keyword_grid
from ..localization.votes import cell_labels, vote_table
from ..report.plotting import figure_style, lens_heatmap, token_label
from ..residual.cache import ResidualCache, strip_token
from .html_views import HtmlView, image_loader, image_png, lens_explorer_view, vote_map_view

__all__ = ["ClusterBrowser", "LensExplorer", "VoteMapExplorer", "image_png"]


def _widgets():
    try:
        import ipywidgets
    except ImportError as exc:  # pragma: no cover - ipywidgets is a notebooks extra
        raise ConfigError("the explorers need ipywidgets: pip install 'esmc_lens[notebooks]'"
                          ) from exc
    return ipywidgets


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _table_html(df: pd.DataFrame, caption: str = "") -> str:
    body = df.to_html(index=False, escape=True, float_format=lambda v: f"{v:.4f}")
    cap = f"<div><b>{html.escape(caption)}</b></div>" if caption else ""
    return cap + body


class _Explorer:
    widget = None

    def _ipython_display_(self):  # pragma: no cover - needs a front end
        from IPython.display import display

        display(self.widget)


# --------------------------------------------------------------------------------------


class LensExplorer(_Explorer):
    """Explore the logit lens of a capture (see module docstring).

    Parameters
    ----------
    cache : ResidualCache
        Any capture (every layer and prompt position is most instructive).
    vlm : VLM, optional
        Gives ``unembed`` and ``tokenizer`` when they are not passed.
    images : ImageDataset, list of PIL images / paths, or ``i -> PIL image``, optional
        The cache's images, to show the selected one.
    keyword : str
        Initial keyword.
    k : int
        Number of top tokens shown for the selected cell.

    Attributes (updated on every change)
    ------------------------------------
    heatmap : DataFrame [layers, positions] — the keyword's lens probability on the selected
        image (NaN on empty slots).
    top_tokens : DataFrame (rank, token, prob) of the selected cell.
    keyword_tokens : the token strings that score the keyword.
    message : "" or why the keyword could not be scored.
    """

    def __init__(self, cache: ResidualCache, vlm=None, *, images=None, keyword: str = "",
                 unembed: Unembed | None = None, tokenizer=None, k: int = 5,
                 image_size: int = 160, draw: bool = True):
        w = _widgets()
        if unembed is None and vlm is None:
            raise ConfigError("LensExplorer needs the lens: pass vlm= or unembed= and "
                              "tokenizer=")
        self.cache = cache
        self.unembed = unembed or Unembed.from_model(vlm)
        self.tokenizer = tokenizer or vlm.tokenizer
        self.k = k
        self.draw = draw
        self.image_size = image_size
        self._load = image_loader(images)
        self._grid_memo: dict = {}
        self._batch = False
        labels = cell_labels(cache)
        self.image = w.Dropdown(options=[(str(n), i) for i, n in enumerate(cache.image_ids)],
                                value=0, description="image")
        self.layer = w.SelectionSlider(options=list(cache.stream), value=cache.stream[-1],
                                       description="layer", continuous_update=False)
        self.position = w.Dropdown(options=[(lab, p) for p, lab in enumerate(labels)],
                                   value=cache.n_positions - 1, description="position")
        self.keyword = w.Text(value=keyword or (cache.keywords or ["the"])[0],
                              description="keyword", continuous_update=False)
        self.image_view = w.Image(format="png", layout=w.Layout(width=f"{image_size}px"))
        self.heatmap_view = w.Image(format="png")
        self.top_view = w.HTML()
        self.status = w.HTML()
        for c in (self.image, self.layer, self.position, self.keyword):
            c.observe(self._on_change, names="value")
        controls = w.VBox([self.image, self.layer, self.position, self.keyword])
        self.widget = w.VBox([w.HBox([controls, self.image_view]), self.status,
                              w.HBox([self.heatmap_view, self.top_view])])
        self.heatmap = pd.DataFrame()
        self.top_tokens = pd.DataFrame()
        self.keyword_tokens: list[str] = []
        self.message = ""
        self._shown_image = None
        self.update()

    # -- logic -------------------------------------------------------------------------
    def keyword_grid(self, image: int, keyword: str) -> pd.DataFrame:
        """The keyword's lens probability at every (layer, position) of one image
        (:func:`esmc_lens.localization.grid.keyword_grid`: the capture's value when it
        scored the keyword, else the lens of the stored states)."""
        key = (image, keyword.strip().lower())
        if key not in self._grid_memo:
            self._grid_memo[key] = keyword_grid(self.cache, image, keyword, self.unembed,
                                                self.tokenizer)
        return self._grid_memo[key]

    def show_cell(self, image: int | None = None, layer: int | None = None,
                  position: int | None = None) -> None:
        """Select an image (index in the cache), a layer (stream index) and a position
        slot, updating once (what a linked vote map or cluster browser calls)."""
        self._batch = True
        try:
            if image is not None:
                self.image.value = int(image)
            if layer is not None:
                self.layer.value = int(layer)
            if position is not None:
                self.position.value = int(position)
        finally:
            self._batch = False
        self.update()

    def static(self, keywords: Sequence[str] | None = None, *, max_images: int = 24,
               model: str = "", quick: bool = False) -> HtmlView:
        """This explorer as a self-contained HTML view (:mod:`esmc_lens.apps.html_views`),
        starting at the current selection; ``keywords`` a reader can type (default: the
        current one and the capture's)."""
        words = list(keywords or [self.keyword.value, *(self.cache.keywords or [])])
        s, p = self.layer.value, self.position.value
        fallback = self.heatmap_view.value if self.draw else b""
        return lens_explorer_view(
            self.cache, self.unembed, self.tokenizer, words, images=self._load, k=self.k,
            max_images=max_images, model=model, quick=quick, fallback_png=fallback,
            start={"image": min(self.image.value, max_images - 1),
                   "row": self.cache.stream_index(s), "pos": p,
                   "keyword": self.keyword.value.strip().lower()})

    def cell_top_tokens(self, image: int, layer: int, position: int) -> pd.DataFrame:
        """Top-k lens tokens of one cell (computed from the stored state): ``token`` decoded,
        ``label`` readable (:func:`~esmc_lens.report.plotting.token_label`)."""
        h = self.cache.states[image, self.cache.stream_index(layer), position].float()
        probs, ids = top_k(h[None], self.unembed, k=self.k)
        raw = token_strings(self.tokenizer, ids[0].tolist())
        return pd.DataFrame({"rank": range(1, self.k + 1),
                             "token": decode_each(self.tokenizer, ids[0].tolist()),
                             "label": [token_label(t) for t in raw],
                             "prob": [float(p) for p in probs[0]]})

    def _on_change(self, _change=None):
        if not self._batch:
            self.update()

    def update(self) -> None:
        i, s, p = self.image.value, self.layer.value, self.position.value
        kw = self.keyword.value.strip()
        self.message = ""
        try:
            if not kw:
                raise ConfigError("type a keyword, e.g. 'red'")
            self.heatmap = self.keyword_grid(i, kw)
            self.keyword_tokens = list(self.heatmap.attrs["tokens"])
        except ConfigError as exc:
            self.heatmap = pd.DataFrame()
            self.keyword_tokens = []
            self.message = str(exc)
        self.top_tokens = self.cell_top_tokens(i, s, p)
        tok = self.cache.tokens[i][p]
        self.cell_label = f"E_{s}({self.position.label})"
        if self.message:
            self.status.value = f"<span style='color:#D55E00'>{html.escape(self.message)}</span>"
        else:
            prob = self.heatmap.loc[s].iloc[p]
            self.status.value = html.escape(
                f"p({kw!r}) at {self.cell_label} = {prob:.4f}; scored by tokens "
                f"{self.keyword_tokens}; token here: {strip_token(tok) or repr(tok)}")
        self.top_view.value = _table_html(self.top_tokens, f"top-{self.k} at {self.cell_label}")
        if self._load is not None and self._shown_image != i:
            self.image_view.value = image_png(self._load(i), self.image_size)
            self._shown_image = i
        if self.draw and not self.heatmap.empty:
            self.heatmap_view.value = self._render(s, p, kw)

    def _render(self, s: int, p: int, kw: str) -> bytes:
        import matplotlib.pyplot as plt

        g = self.heatmap
        with figure_style("two", font_size=7):
            fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * g.shape[1] + 1.8), 3.4),
                                   layout="constrained")
            lens_heatmap(g.to_numpy(dtype=float), list(g.index), list(g.columns), ax=ax,
                         title=f"p('{kw}') on {self.cache.image_ids[self.image.value]}",
                         cbar_label="lens probability (log)",
                         tokens=self.cache.tokens[self.image.value],
                         highlight=[(self.cache.stream_index(s), p)])
        return _figure_png(fig)


# --------------------------------------------------------------------------------------


class VoteMapExplorer(_Explorer):
    """Algorithm 1 live: edit the keywords (comma separated) and tau; see the votes.

    Keywords the capture scored are read from it; others are computed from its states with
    the lens (needs ``vlm`` or ``unembed`` + ``tokenizer``).

    Attributes (updated on every change)
    ------------------------------------
    votes : DataFrame [layers, positions] of vote counts (``vote_table``).
    targets : list of (layer, slot) with the most votes ([] when no cell has a vote).
    target_labels : their ``E_l(seq:token)`` labels.
    max_votes, n_pairs : int.
    keywords : the keywords in use; ``missing`` those that could not be scored.
    """

    def __init__(self, cache: ResidualCache, vlm=None, *, keywords: Sequence[str] | str = (),
                 tau: float = 0.2, unembed: Unembed | None = None, tokenizer=None,
                 draw: bool = True):
        w = _widgets()
        self.cache = cache
        self.unembed = unembed or (Unembed.from_model(vlm) if vlm is not None else None)
        self.tokenizer = tokenizer or (vlm.tokenizer if vlm is not None else None)
        self.draw = draw
        self._probs: dict[str, torch.Tensor] = {}
        if cache.keywords is not None and cache.keyword_probs is not None:
            for j, kw in enumerate(cache.keywords):
                self._probs[kw.strip().lower()] = cache.keyword_probs[..., j].float()
        if isinstance(keywords, str):
            keywords = [keywords]
        start = ", ".join(keywords) if keywords else ", ".join(cache.keywords or [])
        self.keywords_box = w.Text(value=start, description="keywords",
                                   continuous_update=False,
                                   layout=w.Layout(width="60%"))
        self.tau = w.FloatSlider(value=tau, min=0.0, max=0.95, step=0.01, description="tau",
                                 continuous_update=False, readout_format=".2f")
        self.summary_view = w.HTML()
        self.table_view = w.HTML()
        self.map_view = w.Image(format="png")
        self._lens: LensExplorer | None = None
        self.cell_choice = w.Dropdown(options=[], description="cell")
        self.open_button = w.Button(description="open in lens explorer", disabled=True,
                                    tooltip="link(lens_explorer) first")
        self.open_button.on_click(lambda _b: self.open_in_lens())
        for c in (self.keywords_box, self.tau):
            c.observe(lambda _ch: self.update(), names="value")
        self.widget = w.VBox([w.HBox([self.keywords_box, self.tau]), self.summary_view,
                              self.map_view, w.HBox([self.cell_choice, self.open_button]),
                              self.table_view])
        self.update()

    def _keyword_probs(self, kw: str) -> torch.Tensor | None:
        key = kw.strip().lower()
        if key not in self._probs:
            if self.unembed is None or self.tokenizer is None:
                return None
            try:
                groups = keyword_token_ids(self.tokenizer, [kw]).groups
            except ConfigError:
                return None
            self._probs[key] = keyword_probs(self.cache.states.float(), self.unembed,
                                             groups)[..., 0]
        return self._probs[key]

    def update(self) -> None:
        words = [w.strip() for w in self.keywords_box.value.split(",") if w.strip()]
        got, self.missing = [], []
        for kw in dict.fromkeys(words):
            p = self._keyword_probs(kw)
            (got if p is not None else self.missing).append((kw, p))
        self.missing = [kw for kw, _ in self.missing]
        self.keywords = [kw for kw, _ in got]
        labels = cell_labels(self.cache)
        index = pd.Index(self.cache.stream, name="layer")
        if got:
            probs = torch.stack([p for _, p in got], dim=-1)  # [n, S, P, K]
            counts = vote_table(probs, float(self.tau.value),
                                valid=(self.cache.positions >= 0).numpy())
        else:
            counts = np.zeros((len(self.cache.stream), self.cache.n_positions), dtype=np.int64)
        self.votes = pd.DataFrame(counts, index=index,
                                  columns=pd.Index(labels, name="position"))
        self.n_pairs = len(self.cache) * len(got)
        self.max_votes = int(counts.max()) if counts.size else 0
        cells = np.argwhere(counts == self.max_votes) if self.max_votes > 0 else []
        self.targets = [(int(self.cache.stream[s]), int(p)) for s, p in cells]
        self.target_labels = [f"E_{s}({labels[p]})" for s, p in self.targets]
        lines = [f"{len(self.cache)} images x {len(got)} keywords = {self.n_pairs} pairs, "
                 f"tau = {self.tau.value:.2f}"]
        if self.targets:
            lines.append(f"max votes {self.max_votes}/{self.n_pairs} at "
                         f"{', '.join(self.target_labels)}")
        else:
            lines.append("no (image, keyword) pair is above tau at any cell: lower tau or "
                         "change the keywords")
        if self.missing:
            lines.append(f"not scored: {', '.join(self.missing)} (pass vlm= to score new "
                         "keywords)")
        self.summary = "\n".join(lines)
        self.summary_view.value = "<br>".join(html.escape(x) for x in lines)
        shown = self.votes.loc[:, (self.votes > 0).any(axis=0)]
        shown = shown.loc[(shown > 0).any(axis=1)] if not shown.empty else shown
        self.table_view.value = (shown.iloc[::-1].to_html() if not shown.empty
                                 else "<i>no votes</i>")
        opts = self._cell_options()
        self.cell_choice.options = opts
        self.cell_choice.value = opts[0][1] if opts else None
        if self.draw:
            self.map_view.value = self._render()

    def _render(self) -> bytes:
        import matplotlib.pyplot as plt

        v = self.votes
        rows = {s: i for i, s in enumerate(v.index)}
        with figure_style("two", font_size=7):
            fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * v.shape[1] + 1.8), 3.4),
                                   layout="constrained")
            lens_heatmap(v.to_numpy(dtype=float), list(v.index), list(v.columns), ax=ax,
                         scale="linear", vmax=max(1, self.n_pairs),
                         cbar_label=f"votes (of {self.n_pairs} pairs)",
                         title=f"votes, tau={self.tau.value:.2f}",
                         highlight=[(rows[s], p) for s, p in self.targets])
        return _figure_png(fig)

    # -- linked views ----------------------------------------------------------------------
    def link(self, lens: LensExplorer) -> VoteMapExplorer:
        """Open cells in ``lens``: pick a cell (the winners first) and press "open in lens
        explorer". Returns self."""
        self._lens = lens
        self.open_button.disabled = False
        return self

    def _cell_options(self) -> list[tuple[str, tuple[int, int]]]:
        """The cells with votes, most first (at most 12), as (label, (layer, slot))."""
        counts = self.votes.to_numpy()
        order = np.argsort(-counts, axis=None, kind="stable")[:12]
        labels = list(self.votes.columns)
        out = []
        for flat in order:
            r, p = np.unravel_index(int(flat), counts.shape)
            if counts[r, p] <= 0:
                break
            s = int(self.votes.index[r])
            out.append((f"E_{s}({labels[p]}) {int(counts[r, p])} votes", (s, int(p))))
        return out

    def open_in_lens(self, cell: tuple[int, int] | None = None) -> None:
        """Show ``cell`` (default: the chosen one) in the linked lens explorer."""
        cell = cell if cell is not None else self.cell_choice.value
        if self._lens is None or cell is None:
            return
        self._lens.show_cell(layer=cell[0], position=cell[1])

    def static(self, *, link: HtmlView | str | None = None, max_images: int = 24,
               model: str = "", quick: bool = False) -> HtmlView:
        """This vote map as a self-contained HTML view (keywords: the ones in use)."""
        return vote_map_view(self.cache, self.keywords, tau=float(self.tau.value),
                             unembed=self.unembed, tokenizer=self.tokenizer,
                             max_images=max_images, model=model, quick=quick, link=link,
                             fallback_png=self.map_view.value if self.draw else b"")


# --------------------------------------------------------------------------------------


class ClusterBrowser(_Explorer):
    """Thumbnails of each cluster, headed by its name and lens tokens.

    Parameters
    ----------
    images : ImageDataset, list of PIL images / paths, or ``i -> PIL image``
    labels : int array [n_images], the cluster of each image
    clusters : DataFrame from :func:`esmc_lens.report.naming.name_clusters` (``cluster``, ``name``,
        ``size``, ``top_tokens``, optional ``majority_label``/``purity``)
    image_ids : names shown under the thumbnails (default: indices)
    true_labels : optional list of str per image, shown under each thumbnail

    Attributes (updated on every change)
    ------------------------------------
    rows : list of dicts, one per shown cluster: ``cluster``, ``name``, ``tokens``,
        ``header`` (the text above the thumbnails) and ``images`` (indices shown).
    """

    def __init__(self, images, labels, clusters: pd.DataFrame, *,
                 image_ids: Sequence[str] | None = None,
                 true_labels: Sequence[str] | None = None, per_cluster: int = 8,
                 thumb: int = 72):
        w = _widgets()
        self._load = image_loader(images)
        self.labels = np.asarray(labels)
        self.clusters = clusters.reset_index(drop=True)
        self.image_ids = list(image_ids) if image_ids is not None else [
            str(i) for i in range(len(self.labels))]
        self.true_labels = list(true_labels) if true_labels is not None else None
        self.thumb = thumb
        self._png: dict[int, bytes] = {}
        self._lens: LensExplorer | None = None
        opts = [("all clusters", -1)] + [
            (f"{int(r.cluster)}: {r.name} ({int(r.size)})", int(r.cluster))
            for r in self.clusters.itertuples()]
        self.choice = w.Dropdown(options=opts, value=-1, description="cluster")
        self.per_cluster = w.IntSlider(value=per_cluster, min=1, max=max(1, max(
            int((self.labels == c).sum()) for c in np.unique(self.labels))),
            description="per cluster", continuous_update=False)
        self.body = w.VBox()
        for c in (self.choice, self.per_cluster):
            c.observe(lambda _ch: self.update(), names="value")
        self.widget = w.VBox([w.HBox([self.choice, self.per_cluster]), self.body])
        self.update()

    @classmethod
    def from_result(cls, result, images, **kw) -> ClusterBrowser:
        """A browser of an :class:`~esmc_lens.report.result.EsmcResult` (``images``: its images)."""
        truth = None
        if result.y_true is not None and result.class_names is not None:
            truth = [result.class_names[y] if y >= 0 else "" for y in result.y_true]
        return cls(images, result.labels, result.clusters, image_ids=result.image_ids,
                   true_labels=truth, **kw)

    def link(self, lens: LensExplorer) -> ClusterBrowser:
        """Give each thumbnail a button that opens its image in ``lens`` (matched by image
        id; thumbnails of images the lens's capture lacks get none). Returns self."""
        self._lens = lens
        self.update()
        return self

    def open_in_lens(self, i: int) -> bool:
        """Show this browser's image ``i`` in the linked lens explorer; False if the
        explorer's capture does not hold it."""
        if self._lens is None:
            return False
        ids = [str(x) for x in self._lens.cache.image_ids]
        if str(self.image_ids[i]) not in ids:
            return False
        self._lens.show_cell(image=ids.index(str(self.image_ids[i])))
        return True

    def _thumb(self, i: int) -> bytes:
        if i not in self._png:
            self._png[i] = image_png(self._load(i), self.thumb) if self._load else b""
        return self._png[i]

    def update(self) -> None:
        w = _widgets()
        want = self.choice.value
        self.rows, boxes = [], []
        for r in self.clusters.itertuples():
            c = int(r.cluster)
            if want != -1 and c != want:
                continue
            members = np.flatnonzero(self.labels == c)[: self.per_cluster.value].tolist()
            tokens = list(getattr(r, "top_tokens", []) or [])
            header = f"cluster {c}: {r.name}  (n={int(r.size)})  lens: {', '.join(tokens)}"
            if "purity" in self.clusters.columns and not pd.isna(r.purity):
                header += f"  majority: {r.majority_label} ({r.purity:.0%})"
            self.rows.append({"cluster": c, "name": r.name, "tokens": tokens,
                              "header": header, "images": members})
            tiles = []
            for i in members:
                cap = self.image_ids[i]
                if self.true_labels is not None:
                    cap += f" [{self.true_labels[i]}]"
                parts = [w.Image(value=self._thumb(i), format="png",
                                 layout=w.Layout(width=f"{self.thumb}px")),
                         w.HTML(f"<small>{html.escape(cap)}</small>")]
                if self._lens is not None:
                    b = w.Button(description="lens", tooltip="open in the lens explorer",
                                 layout=w.Layout(width=f"{self.thumb}px"))
                    b.on_click(lambda _b, i=i: self.open_in_lens(i))
                    parts.append(b)
                tiles.append(w.VBox(parts))
            boxes.append(w.VBox([w.HTML(f"<b>{html.escape(header)}</b>"),
                                 w.HBox(tiles, layout=w.Layout(flex_flow="row wrap"))]))
        self.body.children = boxes
