"""A fuzz harness for the CLI's contract (issue #13; the case count is in docs/errors.md).

Every case builds something hostile in a fresh folder (a dataset as real folders hold them,
settings, damage to a filled capture cache, an output folder in some state, a disk that
fails at the k-th write, files that change while the run reads them), runs
``esmc-lens run`` in process on the tiny model, and asserts the contract:

* the exit status is 0 or 2 (130 for an interrupt); nothing else escapes ``main`` (an
  escaping exception is a traceback, and fails the case);
* exit 2: exactly one ``esmc-lens: error:`` line, naming what the case expects;
* exit 0: the output folder holds exactly a run's files, none empty; ``results.json`` is
  strict JSON; ``assignments.csv`` lists exactly the dataset's images (names round-trip,
  unicode and commas included) with their true labels; the ESMC score equals the NMI
  recomputed from the assignments; cases that only add junk, damage the cache or rename
  nothing give results identical to the clean run's;
* never a mixed or half-written output folder: after exit 2 (or an interrupt) the output
  folder is exactly as before (absent, or the previous run byte for byte), and no
  temporary ``.part`` / ``.old`` folder is left beside it.

Random choices (which shard, which byte, which bit) come from ``numpy.random`` seeded by the
case number, so every case is reproducible by its id.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from esmc_lens import pipeline
from esmc_lens.apps.cli import main
from esmc_lens.cluster.metrics import nmi
from esmc_lens.data.dataset import load_dataset
from esmc_lens.data.synthetic import make_synthetic_dataset
from esmc_lens.pipeline import run_esmc

PROMPT = "The color of the object is"
BASE_ARGS = ["--model", "tiny", "--criterion", "color", "--prompt", PROMPT, "--keywords",
             "red,green,blue,yellow", "--no-baselines", "--n-seeds", "1", "--n-samples", "4",
             "--batch-size", "4", "--quiet"]
RUN_FILES = {"results.json", "result.pkl", "assignments.csv", "scores.csv", "votes.csv",
             "skipped.csv", "per_seed_ESMC.csv"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Case:
    """One hostile input. ``build(ctx)`` prepares ``ctx`` (folders, extra args, hooks).

    ``expect``: "same" (exit 0, results identical to the clean run), "ok" (exit 0, checked
    for consistency), "error" (exit 2 whose line contains ``match``) or "interrupt" (130).
    """

    id: str
    build: Callable[[Ctx], None]
    expect: str
    match: str = ""


@dataclass
class Ctx:
    """What a case runs on: ``data``, ``out``, extra CLI args, and hooks."""

    tmp: Path
    data: Path
    out: Path
    rng: np.random.Generator
    args: list[str] = field(default_factory=list)
    on_model_load: Callable[[], None] | None = None  # runs between dataset load and the run
    patches: list[tuple[object, str, object]] = field(default_factory=list)
    cache: Path | None = None

    def use_cache(self) -> Path:
        self.cache = self.tmp / "cache"
        self.args += ["--cache-dir", str(self.cache)]
        return self.cache


# -- the base dataset and the clean reference run --------------------------------------------


@pytest.fixture(scope="module")
def base_data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("base") / "syn", n_images=8,
                                  image_size=32)


@pytest.fixture(scope="module")
def reference(base_data, tmp_path_factory, tiny_vlm, module_patch) -> dict:
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["run", *BASE_ARGS, "--data", str(base_data), "--out", str(out)]) == 0
    return _read_run(out)


@pytest.fixture(scope="module")
def module_patch(tiny_vlm):
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "run_esmc", functools.partial(run_esmc, epochs=2))
    mp.setattr("esmc_lens.models.vlm.load_model", lambda *a, **k: tiny_vlm)
    yield mp
    mp.undo()


def _read_run(out: Path) -> dict:
    return {"assignments": pd.read_csv(out / "assignments.csv", dtype=str,
                                       keep_default_na=False),
            "scores": pd.read_csv(out / "scores.csv"),
            "target": json.loads((out / "results.json").read_text())["target"]}


# -- builders: datasets as real folders hold them ----------------------------------------------


def _img(path: Path, rgb=(10, 200, 30), size=(16, 16), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path, format=fmt)
    return path


def _some_image(ctx: Ctx) -> Path:
    files = sorted((ctx.data / "color").rglob("*.png"))
    return files[int(ctx.rng.integers(len(files)))]


def _classes(ctx: Ctx) -> list[Path]:
    return sorted(p for p in (ctx.data / "color").iterdir() if p.is_dir())


def junk_files(ctx):
    (ctx.data / "README.md").write_text("about this dataset")
    (ctx.data / "labels.csv").write_text("a,b\n")
    c = _classes(ctx)[0]
    (c / "Thumbs.db").write_bytes(os.urandom(64))
    (c / "desktop.ini").write_text("[.ShellClassInfo]")
    (c / "notes.txt").write_text("x")


def hidden_entries(ctx):
    c = _classes(ctx)[1]
    (c / ".DS_Store").write_bytes(os.urandom(32))
    (c / ("._" + _some_image(ctx).name)).write_bytes(os.urandom(40))  # AppleDouble
    _img(ctx.data / ".git" / "objects" / "x.png")
    _img(c / ".thumbnails" / "t.png")


def system_folders(ctx):
    _img(ctx.data / "__MACOSX" / "color" / "red" / "x.png", (1, 2, 3))
    _img(_classes(ctx)[0] / "@eaDir" / "a.png" / "SYNOPHOTO_THUMB_M.jpg", (4, 5, 6), fmt="PNG")
    (ctx.data / "$RECYCLE.BIN").mkdir()


def broken_files(kind: str):
    def build(ctx):
        c = _classes(ctx)[int(ctx.rng.integers(4))]
        good = _some_image(ctx).read_bytes()
        if kind == "empty":
            (c / "empty.png").write_bytes(b"")
        elif kind == "truncated-png":
            (c / "cut.png").write_bytes(good[: int(len(good) * ctx.rng.uniform(0.2, 0.9))])
        elif kind == "truncated-jpeg":
            rng = np.random.default_rng(1)
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
                ctx.tmp / "j.jpg")
            data = (ctx.tmp / "j.jpg").read_bytes()
            (c / "cut.jpg").write_bytes(data[: int(len(data) * ctx.rng.uniform(0.3, 0.8))])
        elif kind == "text-as-png":
            (c / "fake.png").write_text("not an image")
        elif kind == "random-bytes":
            (c / "noise.jpg").write_bytes(ctx.rng.bytes(2048))
        elif kind == "bomb":
            import struct
            import zlib

            def chunk(t, d):
                return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

            (c / "bomb.png").write_bytes(
                b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000,
                                                                   1, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
        elif kind == "fifo":
            os.mkfifo(c / "pipe.png")
        elif kind == "folder-named-png":
            (c / "album.png").mkdir()
        elif kind == "bit-flip":  # a corrupted copy under a new name
            data = bytearray(good)
            i = int(ctx.rng.integers(40, len(data)))
            data[i] ^= 1 << int(ctx.rng.integers(8))
            (c / "flipped.png").write_bytes(bytes(data))
    return build


def broken_files_expect(kind: str) -> str:
    # A bit flipped in pixel data that PNG's CRC catches is skipped; one the decoder still
    # reads is a new image: both are fine runs, only the first is the clean run's.
    return "ok" if kind == "bit-flip" else "same"


def symlinks(kind: str):
    def build(ctx):
        c0, c1 = _classes(ctx)[:2]
        if kind == "loop-parent":
            (c0 / "up").symlink_to(ctx.data)
        elif kind == "loop-self":
            (c1 / "me").symlink_to(c1)
        elif kind == "broken":
            (c0 / "gone.png").symlink_to(ctx.tmp / "nowhere.png")
        elif kind == "dup-folder":  # a link to the class's own images, from inside it
            (c0 / "sub").mkdir()
            (c0 / "sub" / "again").symlink_to(c0)
    return build


def duplicate_identical(ctx):
    p = _some_image(ctx)
    (p.parent / "copies").mkdir()
    shutil.copy(p, p.parent / "copies" / p.name)


def same_name_other_class(ctx):
    p = _some_image(ctx)
    other = next(c for c in _classes(ctx) if c != p.parent)
    shutil.copy(p, other / p.name)


def same_name_other_content(where: str):
    def build(ctx):
        p = _some_image(ctx)
        target = (p.parent / "2013" if where == "class" else
                  ctx.data / "shape" / sorted((ctx.data / "shape").iterdir())[0].name)
        target.mkdir(exist_ok=True)
        _img(target / p.name, (1, 2, 3), size=(32, 32))
    return build


def empty_class(ctx):
    (ctx.data / "color" / "purple").mkdir()


def criterion_without_classes(ctx):
    (ctx.data / "texture").mkdir()


def criterion_with_copies(ctx):
    """A new single-class criterion holding exact copies: same image set."""
    for p in sorted((ctx.data / "color").rglob("*.png"))[:3]:
        (ctx.data / "mood" / "calm").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, ctx.data / "mood" / "calm" / p.name)


def criterion_named_path(ctx):
    shutil.copytree(ctx.data / "color", ctx.data / "path")


ODD_NAMES = ["with space.png", "comma,name.png", "quote'\"q.png", "ünïcödé.png", "日本語.png",
             "emoji-🌸.png", "-leading-dash.png", "x" * 180 + ".png", "semi;colon.png",
             "new\nline.png", "tab\tname.png", "percent%s.png", "#hash.png"]


def odd_names(ctx):
    """Every image renamed (consistently under all criteria) to a hostile name."""
    names = sorted({p.name for p in ctx.data.rglob("*.png")})
    pick = ctx.rng.permutation(len(ODD_NAMES))
    mapping = {n: f"{i}{ODD_NAMES[pick[i % len(ODD_NAMES)]]}" for i, n in enumerate(names)}
    for p in list(ctx.data.rglob("*.png")):
        p.rename(p.with_name(mapping[p.name]))


def nfd_names(ctx):
    """One criterion's copies renamed to NFD (as a Mac writes them), the other NFC."""
    for crit, form in (("color", "NFC"), ("shape", "NFD"), ("background", "NFD")):
        for p in list((ctx.data / crit).rglob("*.png")):
            p.rename(p.with_name(unicodedata.normalize(form, "é" + p.name)))


def odd_images(ctx):
    """Modes and sizes real folders hold, under new names in one class."""
    c = _classes(ctx)[0]
    Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(c / "grey16.png")
    Image.new("RGBA", (24, 24), (255, 0, 0, 0)).save(c / "clear.png")
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(c / "cmyk.jpg")
    Image.new("P", (24, 24), 3).save(c / "palette.gif")
    Image.new("1", (24, 24), 1).save(c / "bilevel.bmp")
    Image.new("RGB", (3000, 2000), (200, 10, 10)).save(c / "large.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(c / "one-pixel.png")
    Image.new("RGB", (1000, 4), (9, 90, 9)).save(c / "strip.webp")
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (40, 20), (0, 0, 200)).save(c / "phone.jpg", exif=exif)


def images_in_no_class(ctx):
    _img(ctx.data / "color" / "stray.png")
    _img(ctx.data / "loose.png")


def unlabelled_for_criterion(ctx):
    _img(ctx.data / "shape" / sorted((ctx.data / "shape").iterdir())[0].name / "only.png",
         (7, 7, 7))


def not_a_folder(kind: str):
    def build(ctx):
        if kind == "missing":
            ctx.data = ctx.tmp / "does-not-exist"
        elif kind == "file":
            ctx.data = _img(ctx.tmp / "one.png")
        elif kind == "empty":
            ctx.data = ctx.tmp / "empty"
            ctx.data.mkdir()
        elif kind == "only-junk":
            ctx.data = ctx.tmp / "junk"
            (ctx.data / "color" / "red").mkdir(parents=True)
            (ctx.data / "color" / "red" / "a.txt").write_text("x")
    return build


# -- builders: files that change while the run reads them --------------------------------------


def during_run(kind: str, cached: bool = False):
    def build(ctx):
        if cached:
            ctx.use_cache()
        paths = load_dataset(ctx.data).paths  # the copy the run reads (first criterion's)
        victim = paths[int(ctx.rng.integers(len(paths)))]

        def act():
            if kind == "rewritten":
                _img(victim, (3, 3, 3), size=(32, 32))
            elif kind == "deleted":
                victim.unlink()
            elif kind == "touched":
                st = victim.stat()
                os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            elif kind == "added":  # a new file appears: not part of this run
                _img(victim.parent / "late.png", (5, 5, 5))
        ctx.on_model_load = act
    return build


# -- builders: settings ------------------------------------------------------------------------


def settings(*extra: str):
    def build(ctx):
        ctx.args += list(extra)
    return build


# -- builders: the capture cache ---------------------------------------------------------------


def _fill_cache(ctx) -> list[Path]:
    cache = ctx.use_cache()
    assert main(["run", *BASE_ARGS, "--data", str(ctx.data), "--out", str(ctx.tmp / "first"),
                 "--cache-dir", str(cache)]) == 0
    shutil.rmtree(ctx.tmp / "first")
    return sorted(p for p in cache.glob("*/shards/*") if not p.name.startswith("."))


def cache_damage(kind: str):
    def build(ctx):
        shards = _fill_cache(ctx)
        if kind == "shard-swap":  # two shards of one capture (the target cells')
            shards = [s for s in shards if len(list(s.parent.iterdir())) > 1]
        shard = shards[int(ctx.rng.integers(len(shards)))]
        tensors, meta = shard / "tensors.safetensors", shard / "cache.json"
        target = tensors if kind.startswith("tensors") else meta
        data = bytearray(target.read_bytes()) if target.exists() else bytearray()
        if kind.endswith("bitflip"):
            i = int(ctx.rng.integers(len(data)))
            data[i] ^= 1 << int(ctx.rng.integers(8))
            target.write_bytes(bytes(data))
        elif kind.endswith("truncate"):
            target.write_bytes(bytes(data[: int(ctx.rng.integers(len(data)))]))
        elif kind.endswith("empty"):
            target.write_bytes(b"")
        elif kind.endswith("delete"):
            target.unlink()
        elif kind == "shard-delete":
            shutil.rmtree(shard)
        elif kind == "shard-swap":  # two valid shards trade places
            other = next(s for s in shards if s != shard and s.parent == shard.parent)
            tmp = shard.with_name("swap")
            shard.rename(tmp)
            other.rename(shard)
            tmp.rename(other)
        elif kind == "stale-part":
            (shard.parent / f".{shard.name}.otherhost.123.part").mkdir()
            shutil.copytree(shard, shard.parent / f".{shard.name}.part-junk")
        elif kind == "json-garbage":
            meta.write_text(json.dumps({"format_version": 2, "stream": "everything"}))
        elif kind == "manifest-garbage":
            (shard.parent.parent / "manifest.json").write_text("{{{")
            (shard.parent.parent / "settings.json").write_bytes(os.urandom(50))
        elif kind == "shard-is-file":
            shutil.rmtree(shard)
            shard.write_text("not a folder")
    return build


def cache_dir_is_a_file(ctx):
    (ctx.tmp / "cache").write_text("x")
    ctx.args += ["--cache-dir", str(ctx.tmp / "cache")]


# -- builders: the output folder ---------------------------------------------------------------


def out_state(kind: str):
    def build(ctx):
        if kind in ("previous-run", "previous-run-overwrite"):
            args = [a for a in BASE_ARGS if a != "--no-baselines"]
            assert main(["run", *args, "--data", str(ctx.data), "--out", str(ctx.out)]) == 0
            if kind.endswith("overwrite"):
                ctx.args.append("--overwrite")
        elif kind in ("user-files", "user-files-overwrite"):
            ctx.out.mkdir()
            (ctx.out / "paper.tex").write_text("mine")
            if kind.endswith("overwrite"):
                ctx.args.append("--overwrite")
        elif kind == "is-a-file":
            ctx.out.write_text("x")
        elif kind == "empty":
            ctx.out.mkdir()
        elif kind == "nested":
            ctx.out = ctx.tmp / "a" / "b" / "c" / "run"
        elif kind == "odd-name":
            ctx.out = ctx.tmp / "résultats, 1 (copy) 🌸"
        elif kind == "stale-temp":  # a save killed earlier left its temporary folder
            for suffix in ("part", "old"):
                d = ctx.out.with_name(f".{ctx.out.name}.{_host()}.99999999.{suffix}")
                d.mkdir()
                (d / "results.json").write_text("{}")
        elif kind == "inside-data":
            ctx.out = ctx.data / "color" / "results"
    return build


def _host() -> str:
    from esmc_lens.validate import HOST

    return HOST


def write_fails(at: int, err: int | str):
    """The k-th file the run writes fails: a full disk, a quota, a read-only remount, an
    I/O error, or an interrupt (Ctrl-C)."""
    def build(ctx):
        import esmc_lens.report.result as result_mod

        real = result_mod._write_file
        count = [0]

        def failing(path, body, index):
            count[0] += 1
            if count[0] == at:
                if err == "interrupt":
                    raise KeyboardInterrupt
                raise OSError(err, os.strerror(err), str(path))
            return real(path, body, index)

        ctx.patches.append((result_mod, "_write_file", failing))
    return build


def shard_write_fails(at: int, kind: str):
    def build(ctx):
        import safetensors
        import safetensors.torch

        ctx.use_cache()
        real = safetensors.torch.save_file
        count = [0]

        def failing(tensors, filename, *a, **k):
            count[0] += 1
            if count[0] == at:
                if kind == "safetensors-full":
                    raise safetensors.SafetensorError("Error while serializing: I/O error: No "
                                                      "space left on device (os error 28)")
                raise OSError(errno.EIO, "Input/output error", str(filename))
            return real(tensors, filename, *a, **k)

        ctx.patches.append((safetensors.torch, "save_file", failing))
    return build


# -- the table ---------------------------------------------------------------------------------

CASES: list[Case] = [
    # datasets
    Case("junk-files", junk_files, "same"),
    Case("hidden-entries", hidden_entries, "same"),
    Case("system-folders", system_folders, "same"),
    *[Case(f"broken-{k}", broken_files(k), broken_files_expect(k))
      for k in ("empty", "truncated-png", "truncated-jpeg", "text-as-png", "random-bytes",
                "bomb", "fifo", "folder-named-png", "bit-flip")],
    *[Case(f"symlink-{k}", symlinks(k), "same")
      for k in ("loop-parent", "loop-self", "broken", "dup-folder")],
    Case("duplicate-identical", duplicate_identical, "same"),
    Case("same-name-two-classes", same_name_other_class, "error", "conflicting labels"),
    Case("same-name-other-content-class", same_name_other_content("class"), "error",
         "two different images are named"),
    Case("same-name-other-content-criteria", same_name_other_content("criteria"), "error",
         "two different images are named"),
    Case("empty-class-folder", empty_class, "same"),
    Case("criterion-without-classes", criterion_without_classes, "error", "no class folders"),
    Case("criterion-with-copies", criterion_with_copies, "same"),
    Case("criterion-named-path", criterion_named_path, "error", "clashes with the 'path'"),
    *[Case(f"odd-names-{i}", odd_names, "ok") for i in range(3)],
    Case("nfd-names", nfd_names, "ok"),
    Case("odd-images", odd_images, "ok"),
    Case("images-in-no-class", images_in_no_class, "same"),
    Case("unlabelled-for-criterion", unlabelled_for_criterion, "ok"),
    *[Case(f"data-{k}", not_a_folder(k), "error", m)
      for k, m in (("missing", "does not exist"), ("file", "is a file"),
                   ("empty", "no criterion folders"), ("only-junk", "no readable images"))],
    # files changing while the run reads them
    *[Case(f"during-run-{k}{'-cached' if c else ''}", during_run(k, c), e, m)
      for k, e, m in (("rewritten", "error", "changed on disk"),
                      ("deleted", "error", "does not exist"),
                      ("touched", "error", "changed on disk"),
                      ("added", "same", ""))
      for c in (False, True)],
    # settings
    *[Case(f"bad-{flag[2:]}={v}", settings(flag, v), "error", m) for flag, v, m in (
        ("--k", "0", "at least 2"), ("--k", "1", "at least 2"), ("--k", "-3", "at least 2"),
        ("--k", "9", "more than the 8 images"), ("--k", "100", "more than"),
        ("--alpha", "0", "(0, 1]"), ("--alpha", "-1", "(0, 1]"), ("--alpha", "1.5", "(0, 1]"),
        ("--alpha", "nan", "(0, 1]"), ("--alpha", "inf", "(0, 1]"),
        ("--tau", "-0.1", "[0, 1)"), ("--tau", "1", "[0, 1)"), ("--tau", "nan", "[0, 1)"),
        ("--n-samples", "0", ">= 1"), ("--n-samples", "-5", ">= 1"),
        ("--n-seeds", "0", ">= 1"), ("--batch-size", "0", ">= 1"),
        ("--batch-size", "-2", ">= 1"), ("--seed", "-1", "--seed"),
        ("--seed", str(2**32), "--seed"), ("--criterion", "nope", "not folders of"),
        ("--criterion", "path", "not folders of"), ("--prompt", "", "is empty"),
        ("--prompt", "   ", "is empty"), ("--prompt", "<image> is", "image placeholder"),
        ("--prompt", "red " * 700, "context"), ("--keywords", ",", "no keywords"),
        ("--keywords", " ; ,", "no keywords"),
        ("--keywords", "rouge,vert,bleu,jaune", "0 usable keyword"))],
    Case("bad-keyword-source-user-without-keywords",
         settings("--keyword-source", "user", "--keywords", ""), "error", "needs keywords"),
    *[Case(f"argparse-{flag[2:]}={v}", settings(flag, v), "error", "")
      for flag, v in (("--k", "two"), ("--alpha", "x"), ("--space", "vocab"),
                      ("--keyword-source", "gpt4"), ("--seed", "0.5"))],
    *[Case(f"edge-{flag[2:]}={v}", settings(flag, v), "ok") for flag, v in (
        ("--k", "8"), ("--k", "2"), ("--alpha", "1"), ("--alpha", "1e-9"), ("--tau", "0"),
        ("--tau", "0.999"), ("--n-samples", "100"), ("--batch-size", "1"),
        ("--batch-size", "64"), ("--seed", str(2**32 - 1)), ("--prompt", "La couleur est"),
        ("--prompt", "色は"), ("--keywords", "red,vert,bleu,jaune"),
        ("--keywords", "red"), ("--space", "logits"), ("--space", "hidden"))],
    # the capture cache, filled by a clean run, then damaged
    *[Case(f"cache-{k}-{i}", cache_damage(k), "same")
      for k in ("tensors-bitflip", "meta-bitflip", "tensors-truncate", "meta-truncate",
                "tensors-empty", "meta-empty", "tensors-delete", "meta-delete")
      for i in range(3)],
    *[Case(f"cache-{k}", cache_damage(k), "same")
      for k in ("shard-delete", "shard-swap", "stale-part", "json-garbage",
                "manifest-garbage")],
    Case("cache-shard-is-file", cache_damage("shard-is-file"), "same"),
    Case("cache-dir-is-a-file", cache_dir_is_a_file, "error", "is a file, not a folder"),
    # the output folder
    Case("out-previous-run", out_state("previous-run"), "error", "already holds a saved run"),
    Case("out-previous-run-overwrite", out_state("previous-run-overwrite"), "same"),
    Case("out-user-files", out_state("user-files"), "error", "no esmc-lens run wrote"),
    Case("out-user-files-overwrite", out_state("user-files-overwrite"), "error",
         "no esmc-lens run wrote"),
    Case("out-is-a-file", out_state("is-a-file"), "error", "is a file"),
    Case("out-empty", out_state("empty"), "same"),
    Case("out-nested", out_state("nested"), "same"),
    Case("out-odd-name", out_state("odd-name"), "same"),
    Case("out-stale-temp", out_state("stale-temp"), "same"),
    Case("out-inside-data", out_state("inside-data"), "same"),
    # writes that fail: results (7 files), shards
    *[Case(f"results-write-{k}-fails-{name}", write_fails(k, e), "interrupt"
           if e == "interrupt" else "error", "" if e == "interrupt" else m)
      for k in (1, 3, 7)
      for name, e, m in (("ENOSPC", errno.ENOSPC, "No space left"),
                         ("EDQUOT", errno.EDQUOT, "quota"),
                         ("EROFS", errno.EROFS, "Read-only"),
                         ("EIO", errno.EIO, "Input/output"),
                         ("interrupt", "interrupt", ""))],
    *[Case(f"results-write-fails-over-previous-{name}",
           lambda ctx, e=e: (out_state("previous-run-overwrite")(ctx),
                             write_fails(2, e)(ctx)),
           "interrupt" if e == "interrupt" else "error", m)
      for name, e, m in (("ENOSPC", errno.ENOSPC, "No space left"),
                         ("interrupt", "interrupt", ""))],
    *[Case(f"shard-write-{k}-fails-{kind}", shard_write_fails(k, kind), "error", m)
      for k in (1, 2, 3)
      for kind, m in (("safetensors-full", "is full"), ("eio", "cannot be written"))],
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_contract(case: Case, base_data, reference, module_patch, tiny_vlm, tmp_path,
                  monkeypatch, capsys):
    ctx = Ctx(tmp=tmp_path, data=tmp_path / "data", out=tmp_path / "out",
              rng=np.random.default_rng(CASES.index(case)))
    shutil.copytree(base_data, ctx.data)
    case.build(ctx)
    args = _args(ctx)
    before = _snapshot(ctx.out)
    expected_ds = None
    if case.expect in ("same", "ok"):
        expected_ds = load_dataset(ctx.data)
    if ctx.on_model_load is not None:
        def load_then_act(*a, **k):
            ctx.on_model_load()
            return tiny_vlm

        monkeypatch.setattr("esmc_lens.models.vlm.load_model", load_then_act)
    for obj, name, value in ctx.patches:
        monkeypatch.setattr(obj, name, value)
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse: exit 2 with its usage line
        rc = exc.code
    out, err = capsys.readouterr()
    monkeypatch.undo()
    assert "Traceback" not in out + err
    assert rc in (0, 2, 130), (rc, err)
    _assert_no_temp_folders(ctx.out)

    if case.expect == "interrupt":
        assert rc == 130 and "interrupted" in err
        assert _snapshot(ctx.out) == before
        return
    if case.expect == "error":
        assert rc == 2, err
        lines = [ln for ln in err.splitlines() if "error:" in ln]
        assert len(lines) == 1, err
        assert case.match in lines[0], lines[0]
        assert _snapshot(ctx.out) == before  # nothing written, nothing mixed
        return
    assert rc == 0, err
    _assert_complete_run(ctx.out, expected_ds)
    if case.expect == "same":
        got = _read_run(ctx.out)
        pd.testing.assert_frame_equal(got["assignments"], reference["assignments"])
        pd.testing.assert_frame_equal(got["scores"], reference["scores"])
        assert got["target"] == reference["target"]


def _args(ctx: Ctx) -> list[str]:
    base = list(BASE_ARGS)
    extra = list(ctx.args)
    for flag in {a for a in extra if a.startswith("--") and a in base}:
        i = base.index(flag)  # a case's value replaces the default one
        del base[i:i + 2]
    return ["run", *base, "--data", str(ctx.data), "--out", str(ctx.out), *extra]


def _snapshot(out: Path) -> dict | str | None:
    if not out.exists():
        return None
    if out.is_file():
        return out.read_text()
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


def _assert_no_temp_folders(out: Path) -> None:
    if out.parent.exists():
        left = [p.name for p in out.parent.iterdir()
                if p.name.startswith(f".{out.name}.") and p.suffix in (".part", ".old")]
        assert left == [], left


def _assert_complete_run(out: Path, ds) -> None:
    names = {p.name for p in out.iterdir()}
    assert names == RUN_FILES, names
    for p in out.iterdir():
        assert p.stat().st_size > 0, p
    doc = json.loads((out / "results.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))
    assert doc["n_images"] == len(ds)
    df = pd.read_csv(out / "assignments.csv", dtype=str, keep_default_na=False)
    assert list(df["image"]) == ds.names  # every name round-trips exactly
    truth = [ds.labels.loc[n, "color"] for n in ds.names]
    assert list(df["true_label"]) == ["" if pd.isna(t) else t for t in truth]
    clusters = df["cluster"].astype(int).to_numpy()
    k = doc["settings"]["n_clusters"]
    assert clusters.min() >= 0 and clusters.max() < k
    assert sum(c["size"] for c in doc["clusters"]) == len(ds)
    y = ds.y("color")
    assert doc["scores"]["nmi"] == pytest.approx(nmi(y, clusters), abs=1e-12)
