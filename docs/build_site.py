"""Build the static docs site (``make docs``): API reference + the executed notebooks.

    python docs/build_site.py [--executed outputs/executed] [--out site] [--check]

* ``site/api/``: the API reference, from the docstrings (pdoc);
* ``site/notebooks/NN_name.html``: each executed quick-mode notebook with its outputs
  (nbconvert's lab template), every figure inline, the static interactive views working;
* ``site/index.html``: the gallery: one card per notebook with its first figure.

The pages need no network and no kernel: scripts that nbconvert would load from a CDN
(require.js, MathJax, mermaid) are left out, and kernel-backed widget outputs are replaced
by a note pointing at the static view beside them. ``--check`` exits 2 (and says why) when
an executed notebook is missing or older than its source: ``make notebooks`` makes them.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = ("<div class='esmc-widget-note' style='color:#555;font-style:italic'>"
               "(a live ipywidgets explorer: it runs in Jupyter with a kernel; the static "
               "view below works on this page)</div>")


def stale(executed: Path) -> list[str]:
    """Why the executed notebooks cannot be used (empty: they can)."""
    out = []
    for src in NOTEBOOKS:
        done = executed / src.name
        if not done.is_file():
            out.append(f"{done} is missing")
        elif done.stat().st_mtime < src.stat().st_mtime:
            out.append(f"{done} is older than {src}")
    return out


def _title(nb) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return "notebook"


def _first_png(nb) -> bytes | None:
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if png:
                return base64.b64decode(png)
    return None


def _strip_kernel_widgets(nb) -> None:
    """Kernel widget outputs need the kernel (or widget JS from a CDN): a note instead."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_MIME in data:
                data.pop(WIDGET_MIME)
                data.pop("text/plain", None)
                data["text/html"] = WIDGET_NOTE


_REMOTE_SCRIPT = re.compile(r"<script[^>]*\bsrc=\"https?://[^\"]*\"[^>]*>\s*</script>", re.I)
_MERMAID = re.compile(r"<script type=\"module\">(?:(?!</script>).)*mermaid(?:(?!</script>).)*"
                      r"</script>", re.S)
_MATHJAX = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.S)


def notebook_html(nb) -> str:
    """One notebook as a standalone page (no network, no kernel)."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    body = _MATHJAX.sub("", body)
    body = _MERMAID.sub("", body)
    body = _REMOTE_SCRIPT.sub("", body)
    nav = ("<div style='padding:6px 12px;background:#f4f4f4;font:13px sans-serif'>"
           "<a href='../index.html'>esmc_lens gallery</a> · "
           "<a href='../api/esmc_lens.html'>API reference</a></div>")
    return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + nav, body, count=1)


_CARD = """<a class='card' href='notebooks/{page}'><div class='thumb'>{img}</div>
<div class='name'>{title}</div></a>"""

_INDEX = """<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>
<title>esmc_lens: gallery</title><style>
body{{font:14px/1.4 system-ui,sans-serif;margin:24px;max-width:1200px}}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:16px}}
.card{{display:block;border:1px solid #ddd;border-radius:6px;padding:8px;color:inherit;
text-decoration:none}}
.card:hover{{border-color:#0072B2}} .thumb{{height:170px;display:flex;align-items:center;
justify-content:center;overflow:hidden;background:#fafafa}}
.thumb img{{max-width:100%;max-height:170px}} .name{{margin-top:6px;font-weight:600}}
</style></head><body><h1>esmc_lens</h1>
<p>Explainable multiple clustering with multimodal LLMs and the logit lens: the notebooks,
executed in quick mode (a smoke run on a few images: every figure says QUICK and names the
model; the numbers are not results), and the <a href='api/esmc_lens.html'>API reference</a>.
</p><div class='grid'>{cards}</div></body></html>
"""


def build(executed: Path, out: Path) -> list[Path]:
    import nbformat

    why = stale(executed)
    if why:
        raise SystemExit("docs: executed notebooks are not ready (" + "; ".join(why)
                         + "): run 'make notebooks' first (ESMC_QUICK=1)")
    if out.exists():
        shutil.rmtree(out)
    (out / "notebooks").mkdir(parents=True)
    (out / "img").mkdir()
    # esmc_lens' __all__ lists its top-level API, which would hide the stage packages from
    # pdoc: name them (each one's modules are walked).
    stages = sorted(p.parent.name for p in (REPO / "esmc_lens").glob("*/__init__.py"))
    tops = sorted(p.stem for p in (REPO / "esmc_lens").glob("*.py")
                  if not p.stem.startswith("_"))
    modules = ["esmc_lens", *(f"esmc_lens.{m}" for m in stages + tops)]
    subprocess.run([sys.executable, "-m", "pdoc", *modules, "--docformat", "numpy",
                    "-o", str(out / "api")], check=True, cwd=REPO)
    pages, cards = [], []
    for src in NOTEBOOKS:
        nb = nbformat.read(executed / src.name, as_version=4)
        title = _title(nb)
        png = _first_png(nb)
        img = ""
        if png:
            (out / "img" / f"{src.stem}.png").write_bytes(png)
            img = f"<img src='img/{src.stem}.png' alt='{html.escape(title)}'>"
        _strip_kernel_widgets(nb)
        page = out / "notebooks" / f"{src.stem}.html"
        page.write_text(notebook_html(nb))
        pages.append(page)
        cards.append(_CARD.format(page=page.name, img=img or "(no figure)",
                                  title=html.escape(title)))
    (out / "index.html").write_text(_INDEX.format(cards="\n".join(cards)))
    (out / "site.json").write_text(json.dumps({"pages": [p.name for p in pages]}))
    return pages


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--executed", type=Path, default=REPO / "outputs" / "executed")
    ap.add_argument("--out", type=Path, default=REPO / "site")
    ap.add_argument("--check", action="store_true",
                    help="exit 2 if the executed notebooks are missing or stale")
    a = ap.parse_args(argv)
    if a.check:
        why = stale(a.executed)
        for w in why:
            print(f"docs: {w}", file=sys.stderr)
        return 2 if why else 0
    pages = build(a.executed, a.out)
    print(f"docs: {a.out}/index.html, {len(pages)} notebook pages, API in {a.out}/api/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
