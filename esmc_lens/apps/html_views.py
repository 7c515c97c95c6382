"""Interactive views that survive static rendering: self-contained HTML + JavaScript.

The kernel-backed explorers (:mod:`esmc_lens.apps.widgets`) need a running kernel; these
views carry their data (computed here, once) and a small script inline, and need neither a
kernel nor the network: they work in an executed notebook's HTML (nbconvert, nbviewer, a
docs page) and in a saved ``.html`` file. Where scripts do not run (an untrusted notebook),
a static PNG of the initial state is shown instead.

* :func:`lens_explorer_view` — image slider, layer slider, position, keyword box (any of the
  keywords the page was built with); the keyword's lens probability over (layer, position)
  on the shared log scale, the selected cell's top-k lens tokens. Click a cell to select it.
* :func:`vote_map_view` — Algorithm 1 live: tau slider and keyword box; votes per cell
  (``vote_table``'s counts), the winning cells. Clicking a cell opens it in a lens explorer
  view of the same page (``link=``).

Both return a :class:`HtmlView` (displayed by Jupyter; ``.save(path)`` writes a page).
Every number a view shows is in its ``data`` (tested against the library's own functions).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.images import open_rgb
from ..lens.readout import top_k
from ..lens.tokens import token_strings
from ..localization.grid import keyword_grid
from ..localization.votes import cell_labels
from ..report.plotting import PROB_FLOOR, provenance, readable_tokens, token_label
from ..residual.cache import ResidualCache

__all__ = ["HtmlView", "image_loader", "image_png", "lens_explorer_view", "page",
           "vote_map_view"]

MAX_IMAGES = 24  # images a static view carries (its size grows with each)


def _viridis_lut(n: int = 64) -> list[str]:
    import matplotlib as mpl

    cmap = mpl.colormaps["viridis"]
    return [mpl.colors.to_hex(cmap(i / (n - 1))) for i in range(n)]


def _round(x: np.ndarray, digits: int = 4) -> list:
    """Nested lists of ``x`` with ``digits`` significant digits (NaN -> None)."""
    def one(v: float):
        if not math.isfinite(v):
            return None
        return float(f"{v:.{digits}g}")

    return np.vectorize(one, otypes=[object])(np.asarray(x, dtype=float)).tolist()


def image_png(im, size: int | None = None) -> bytes:
    """PNG bytes of the PIL image ``im`` (thumbnailed to ``size`` px when given)."""
    im = im.convert("RGB")
    if size:
        im = im.copy()
        im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def image_loader(images) -> Callable[[int], Image.Image] | None:
    """``i -> PIL image`` of an ImageDataset, a list of PIL images or paths, or a callable."""
    if images is None:
        return None
    if callable(images) and not hasattr(images, "open"):
        return images
    if hasattr(images, "open") and hasattr(images, "names"):  # ImageDataset
        return images.open
    seq = list(images)

    def load(i: int) -> Image.Image:
        im = seq[i]
        if isinstance(im, Image.Image):
            return im

        return open_rgb(im)

    return load


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@dataclass
class HtmlView:
    """A self-contained interactive view: ``html`` (a ``<div>`` with its script), its
    ``data`` (what it shows) and a PNG ``fallback`` shown where scripts do not run."""

    kind: str
    element_id: str
    data: dict
    html: str
    fallback_png: bytes = field(default=b"", repr=False)

    def _repr_html_(self) -> str:
        return self.html

    def save(self, path: str | Path, title: str = "") -> Path:
        """Write a standalone page holding this view."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page([self], title or self.kind))
        return path


def page(views: Sequence[HtmlView], title: str) -> str:
    """A standalone HTML page holding ``views`` (no external resources)."""
    body = "\n".join(v.html for v in views)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title></head><body style='font-family:sans-serif'>{body}</body></html>")


_CSS = """
<style>
.esmc-view{font:12px/1.35 system-ui,sans-serif;border:1px solid #ccc;padding:8px;margin:4px 0;
 max-width:100%;overflow-x:auto}
.esmc-view .esmc-controls{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin:4px 0}
.esmc-view table.esmc-grid{border-collapse:collapse;margin-top:6px}
.esmc-view table.esmc-grid td{width:30px;height:13px;padding:0;border:1px solid #fff;
 cursor:pointer;font-size:9px;text-align:center;color:#fff}
.esmc-view table.esmc-grid td.sel{outline:2px solid #D55E00;outline-offset:-2px}
.esmc-view table.esmc-grid td.empty{background:#ddd;cursor:default}
.esmc-view table.esmc-grid th{font-weight:normal;font-size:10px;padding:0 3px;
 white-space:nowrap}
.esmc-view table.esmc-grid thead th{writing-mode:vertical-rl;transform:rotate(180deg);
 text-align:left;height:90px}
.esmc-view table.esmc-top td,.esmc-view table.esmc-top th{padding:1px 6px;text-align:left}
.esmc-view .esmc-status{margin:4px 0;font-weight:bold}
.esmc-view .esmc-note{color:#555;font-size:11px}
.esmc-view .esmc-fallback{max-width:100%}
</style>
"""

# Shared helpers of both views (defined once per page, guarded).
_JS_COMMON = """
window.esmcViews = window.esmcViews || {};
window.esmcLib = window.esmcLib || {
  el: function(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in (attrs || {})) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  },
  logColor: function(p, floor, lut) {
    if (p === null) return null;
    var lo = Math.log10(floor), t = (Math.log10(Math.max(p, floor)) - lo) / (0 - lo);
    return lut[Math.max(0, Math.min(lut.length - 1, Math.round(t * (lut.length - 1))))];
  },
  linColor: function(v, vmax, lut) {
    var t = vmax > 0 ? v / vmax : 0;
    return lut[Math.max(0, Math.min(lut.length - 1, Math.round(t * (lut.length - 1))))];
  },
  grid: function(host, layers, labels, colorOf, titleOf, onClick, selected, textOf) {
    var E = window.esmcLib.el, t = E('table', {'class': 'esmc-grid'});
    var head = E('thead'), hr = E('tr');
    hr.appendChild(E('th', {}, 'layer'));
    labels.forEach(function(l) { hr.appendChild(E('th', {}, l)); });
    head.appendChild(hr);
    var body = E('tbody');
    for (var r = layers.length - 1; r >= 0; r--) {
      var tr = E('tr');
      tr.appendChild(E('th', {}, String(layers[r])));
      for (var p = 0; p < labels.length; p++) {
        var c = colorOf(r, p), td = E('td', {'data-row': r, 'data-pos': p});
        if (c === null) { td.className = 'empty'; }
        else {
          td.style.background = c;
          if (textOf) td.textContent = textOf(r, p);
          td.title = titleOf(r, p);
          (function(r, p) { td.onclick = function() { onClick(r, p); }; })(r, p);
        }
        if (selected && selected[0] === r && selected[1] === p) td.className += ' sel';
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
    t.appendChild(head); t.appendChild(body);
    host.innerHTML = ''; host.appendChild(t);
  }
};
"""

# Each view's script: the data and the live part of its own element (the static PNG hidden).
_JS_OPEN = """(function() {
  var root = document.getElementById(%(id)s), D = JSON.parse(root.querySelector(
      'script[type="application/json"]').textContent), L = window.esmcLib;
  root.querySelector('.esmc-fallback').style.display = 'none';
  var live = root.querySelector('.esmc-live'); live.style.display = '';
  var q = function(c) { return live.querySelector('.' + c); };
"""

_JS_LENS = """
  var img = q('esmc-image'), layer = q('esmc-layer'), pos = q('esmc-position'),
      kw = q('esmc-keyword');
  img.max = D.images.length - 1; layer.max = D.layers.length - 1;
  D.labels.forEach(function(l, p) { pos.appendChild(L.el('option', {value: p}, l)); });
  var state = {image: D.start.image, row: D.start.row, pos: D.start.pos,
               keyword: D.start.keyword};
  img.value = state.image; layer.value = state.row; pos.value = state.pos;
  kw.value = state.keyword;
  function render() {
    var g = D.grids[state.keyword], im = D.images[state.image];
    q('esmc-image-label').textContent = im.id;
    q('esmc-layer-label').textContent = D.layers[state.row];
    q('esmc-thumb').src = im.thumb;
    var cell = 'E_' + D.layers[state.row] + '(' + D.labels[state.pos] + ')';
    var status = q('esmc-status');
    if (!g) {
      status.textContent = 'keyword ' + JSON.stringify(state.keyword) + ' was not ' +
        'precomputed for this page: one of ' + Object.keys(D.grids).join(', ');
      status.style.color = '#D55E00';
      q('esmc-heat').innerHTML = '';
    } else {
      var v = g[state.image][state.row][state.pos];
      status.style.color = '';
      status.textContent = "p('" + state.keyword + "') at " + cell + ' = ' +
        (v === null ? 'empty slot' : v.toPrecision(4)) + ' on ' + im.id;
      L.grid(q('esmc-heat'), D.layers, D.labels,
        function(r, p) { return L.logColor(g[state.image][r][p], D.floor, D.lut); },
        function(r, p) { var x = g[state.image][r][p];
          return 'E_' + D.layers[r] + '(' + D.labels[p] + ') p=' + (x === null ? '-' :
            x.toPrecision(3)); },
        function(r, p) { select(state.image, r, p); }, [state.row, state.pos]);
    }
    var top = D.top[state.image][state.row][state.pos], rows = '';
    var tb = q('esmc-top'); tb.innerHTML = '';
    tb.appendChild(L.el('caption', {}, 'top-' + D.k + ' lens tokens at ' + cell));
    var hr = L.el('tr'); ['rank', 'token', 'prob'].forEach(function(h) {
      hr.appendChild(L.el('th', {}, h)); }); tb.appendChild(hr);
    (top || []).forEach(function(t, j) {
      var tr = L.el('tr'); tr.appendChild(L.el('td', {}, String(j + 1)));
      tr.appendChild(L.el('td', {}, t[0])); tr.appendChild(L.el('td', {}, t[1].toPrecision(3)));
      tb.appendChild(tr); });
    root.setAttribute('data-state', JSON.stringify(state));
  }
  function select(image, row, p) {
    state.image = image; state.row = row; state.pos = p;
    img.value = image; layer.value = row; pos.value = p; render();
  }
  img.oninput = function() { state.image = +img.value; render(); };
  layer.oninput = function() { state.row = +layer.value; render(); };
  pos.onchange = function() { state.pos = +pos.value; render(); };
  kw.oninput = function() { state.keyword = kw.value.trim().toLowerCase(); render(); };
  window.esmcViews[%(id)s] = {select: function(layerValue, p) {
    var r = D.layers.indexOf(layerValue); if (r >= 0) select(state.image, r, p);
    root.scrollIntoView({block: 'nearest'}); }};
  render();
"""

_JS_VOTES = """
  var tau = q('esmc-tau'), kw = q('esmc-keywords');
  tau.value = D.tau; kw.value = D.start.join(', ');
  function render() {
    var t = +tau.value, words = kw.value.split(',').map(function(w) {
      return w.trim().toLowerCase(); }).filter(function(w) { return w; });
    var use = [], missing = [];
    words.forEach(function(w) { if (w in D.probs) { if (use.indexOf(w) < 0) use.push(w); }
                                else missing.push(w); });
    var S = D.layers.length, P = D.labels.length, votes = [], max = 0;
    for (var r = 0; r < S; r++) { votes.push([]); for (var p = 0; p < P; p++) {
      var n = 0;
      use.forEach(function(w) { var a = D.probs[w];
        for (var i = 0; i < a.length; i++) { var x = a[i][r][p];
          if (x !== null && x > t) n++; } });
      votes[r].push(n); if (n > max) max = n; } }
    var pairs = D.n_images * use.length, targets = [];
    if (max > 0) for (var r2 = 0; r2 < S; r2++) for (var p2 = 0; p2 < P; p2++)
      if (votes[r2][p2] === max) targets.push('E_' + D.layers[r2] + '(' + D.labels[p2] + ')');
    q('esmc-tau-label').textContent = t.toFixed(2);
    var lines = D.n_images + ' images x ' + use.length + ' keywords = ' + pairs +
      ' pairs, tau = ' + t.toFixed(2) + '. ';
    var shown = targets.slice(0, 8).join(', ') +
      (targets.length > 8 ? ' and ' + (targets.length - 8) + ' more cells' : '');
    lines += max > 0 ? 'max votes ' + max + '/' + pairs + ' at ' + shown
                     : 'no (image, keyword) pair is above tau at any cell: lower tau or ' +
                       'change the keywords';
    if (missing.length) lines += '. not precomputed: ' + missing.join(', ');
    q('esmc-status').textContent = lines;
    L.grid(q('esmc-heat'), D.layers, D.labels,
      function(r, p) { return D.empty[p] ? null : L.linColor(votes[r][p], pairs, D.lut); },
      function(r, p) { return 'E_' + D.layers[r] + '(' + D.labels[p] + ') votes ' +
        votes[r][p] + '/' + pairs; },
      function(r, p) { var v = window.esmcViews[D.link];
        if (v) v.select(D.layers[r], p); }, null,
      function(r, p) { return votes[r][p] > 0 ? String(votes[r][p]) : ''; });
    root.setAttribute('data-state', JSON.stringify({tau: t, keywords: use, max: max,
      targets: targets, total: votes.reduce(function(a, row) { return a + row.reduce(
        function(b, x) { return b + x; }, 0); }, 0)}));
  }
  tau.oninput = render; kw.oninput = render;
  render();
"""


def _shell(element_id: str, kind: str, title: str, data: dict, controls: str, body: str,
           script: str, fallback_png: bytes) -> str:
    fallback = (f"<img class='esmc-fallback' alt='{html.escape(title)} (static)' "
                f"src='{_png_data_uri(fallback_png)}'>" if fallback_png else
                "<div class='esmc-fallback'>(this view needs JavaScript)</div>")
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return (f"{_CSS}<div class='esmc-view esmc-{kind}' id='{element_id}'>"
            f"<div><b>{html.escape(title)}</b></div>"
            f"<div class='esmc-note'>{html.escape(data['note'])}</div>{fallback}"
            f"<div class='esmc-live' style='display:none'><div class='esmc-controls'>{controls}"
            f"</div><div class='esmc-status'></div>{body}</div>"
            f"<script type='application/json'>{payload}</script>"
            f"<script>{_JS_COMMON}{(_JS_OPEN + script) % {'id': json.dumps(element_id)}}"
            "})();</script></div>")


def _labels(cache: ResidualCache) -> list[str]:
    """Readable ``seq:token`` labels of the cache's slots (first image that fills each)."""
    raw = cell_labels(cache)
    toks = []
    for p in range(cache.n_positions):
        filled = (cache.positions[:, p] >= 0).nonzero()
        i = int(filled[0, 0]) if len(filled) else 0
        toks.append(cache.tokens[i][p])
    words = readable_tokens(toks)
    return [f"{lab.partition(':')[0]}:{w}" for lab, w in zip(raw, words, strict=True)]


def lens_explorer_view(cache: ResidualCache, unembed, tokenizer, keywords: Sequence[str], *,
                       images=None, k: int = 5, max_images: int = MAX_IMAGES,
                       model: str = "", quick: bool = False, start: dict | None = None,
                       fallback_png: bytes = b"", element_id: str | None = None) -> HtmlView:
    """A static lens explorer of the first ``max_images`` images of ``cache``.

    ``keywords``: the words a reader can type (each image's grid is computed for each,
    :func:`~esmc_lens.localization.grid.keyword_grid`). ``images``: the cache's images, for
    thumbnails (an ``ImageDataset``, a list, or ``i -> PIL image``). Top-k lens tokens
    of every cell come from the capture when it kept ``k`` of them, else from the lens.
    """
    n = min(len(cache), max_images)
    words = list(dict.fromkeys(w.strip().lower() for w in keywords if w.strip()))
    grids = {w: [_round(keyword_grid(cache, i, w, unembed, tokenizer).to_numpy())
                 for i in range(n)] for w in words}
    valid = (cache.positions[:n] >= 0).numpy()
    if cache.top_ids is not None and cache.top_ids.shape[-1] >= k:
        ids, probs = cache.top_ids[:n, ..., :k], cache.top_probs[:n, ..., :k]
    else:
        probs, ids = top_k(cache.states[:n].float(), unembed, k=k)
    names = token_strings(tokenizer, ids.reshape(-1).tolist())
    names = np.asarray([token_label(t) for t in names], dtype=object).reshape(ids.shape)
    pr = probs.float().numpy()
    top = [[[[[str(names[i, s, p, j]), float(f"{pr[i, s, p, j]:.4g}")] for j in range(k)]
             if valid[i, p] else None for p in range(cache.n_positions)]
            for s in range(len(cache.stream))] for i in range(n)]
    load = image_loader(images)
    thumbs = [_png_data_uri(image_png(load(i), 96)) if load is not None else "" for i in range(n)]
    start = {"image": 0, "row": len(cache.stream) - 1, "pos": cache.n_positions - 1,
             "keyword": words[0] if words else ""} | (start or {})
    note = (f"{provenance(model, quick)} · {n} of {len(cache)} images · keywords "
            f"precomputed: {', '.join(words)} · colour: lens probability, log scale "
            f"{PROB_FLOOR:g} .. 1 · click a cell to select it")
    data = {"layers": list(cache.stream), "labels": _labels(cache), "grids": grids,
            "top": top, "k": k, "floor": PROB_FLOOR, "lut": _viridis_lut(),
            "images": [{"id": str(cache.image_ids[i]), "thumb": thumbs[i]} for i in range(n)],
            "start": start, "note": note}
    eid = element_id or f"esmc-lens-{uuid.uuid4().hex[:10]}"
    controls = ("<label>image <input type='range' class='esmc-image' min='0' step='1'> "
                "<span class='esmc-image-label'></span></label>"
                "<label>layer <input type='range' class='esmc-layer' min='0' step='1'> "
                "<span class='esmc-layer-label'></span></label>"
                "<label>position <select class='esmc-position'></select></label>"
                "<label>keyword <input type='text' class='esmc-keyword' size='12' "
                f"list='{eid}-kw'></label><datalist id='{eid}-kw'>"
                + "".join(f"<option value='{html.escape(w)}'>" for w in words)
                + "</datalist>")
    body = ("<div style='display:flex;gap:16px;align-items:flex-start'>"
            "<img class='esmc-thumb' alt='selected image' width='96'>"
            "<div class='esmc-heat'></div><table class='esmc-top'></table></div>")
    title = "Lens explorer (static: no kernel needed)"
    return HtmlView("lens-explorer", eid, data,
                    _shell(eid, "lens", title, data, controls, body, _JS_LENS, fallback_png),
                    fallback_png)


def vote_map_view(cache: ResidualCache, keywords: Sequence[str], *, tau: float = 0.2,
                  unembed=None, tokenizer=None, max_images: int = MAX_IMAGES,
                  model: str = "", quick: bool = False, link: HtmlView | str | None = None,
                  fallback_png: bytes = b"", element_id: str | None = None) -> HtmlView:
    """A static vote map (Algorithm 1 on the first ``max_images`` images of ``cache``).

    ``keywords``: the words a reader can type; each image's grid of each is carried
    (:func:`~esmc_lens.localization.grid.keyword_grid`), and the page counts, per cell, the
    (image, keyword) pairs above tau exactly as
    :func:`~esmc_lens.localization.votes.vote_table` does. ``link``: a lens explorer view
    (or its element id) that a clicked cell opens.
    """
    n = min(len(cache), max_images)
    words = list(dict.fromkeys(w.strip().lower() for w in keywords if w.strip()))
    probs = {w: [_round(keyword_grid(cache, i, w, unembed, tokenizer).to_numpy(), 6)
                 for i in range(n)] for w in words}
    empty = [bool((cache.positions[:n, p] < 0).all()) for p in range(cache.n_positions)]
    link_id = link.element_id if isinstance(link, HtmlView) else link
    note = (f"{provenance(model, quick)} · {n} of {len(cache)} images · keywords "
            f"precomputed: {', '.join(words)} · colour: votes, 0 .. pairs"
            + (" · click a cell to open it in the lens explorer above" if link_id else ""))
    data = {"layers": list(cache.stream), "labels": _labels(cache), "probs": probs,
            "n_images": n, "tau": tau, "start": words, "empty": empty,
            "lut": _viridis_lut(), "link": link_id, "note": note}
    eid = element_id or f"esmc-votes-{uuid.uuid4().hex[:10]}"
    controls = ("<label>keywords <input type='text' class='esmc-keywords' size='40'></label>"
                "<label>tau <input type='range' class='esmc-tau' min='0' max='0.95' "
                "step='0.01'> <span class='esmc-tau-label'></span></label>")
    body = "<div class='esmc-heat'></div>"
    title = "Vote map, Algorithm 1 (static: no kernel needed)"
    return HtmlView("vote-map", eid, data,
                    _shell(eid, "votes", title, data, controls, body, _JS_VOTES, fallback_png),
                    fallback_png)
