"""Decoding image files: every image reaches the model as 8-bit RGB, or as a clear error.

Images are turned upright by their EXIF orientation tag (phone photos store the sensor's
pixels plus a tag saying how to rotate them); the tag is then dropped, so an image is
never rotated twice. ``PIL.Image.MAX_IMAGE_PIXELS`` is left at Pillow's default so
decompression bombs raise.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageError

__all__ = ["PIL_ERRORS", "image_problem", "open_rgb", "to_rgb", "upright"]

# Errors Pillow raises for unreadable / truncated / oversized files.
PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _white_composite(im: Image.Image) -> Image.Image:
    """Composite an RGBA image on an opaque white background and return RGB."""
    background = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, im).convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded image of any common mode to 8-bit RGB.

    Parameters
    ----------
    im : PIL.Image.Image
        Image of mode ``RGB``, ``L``, ``1``, ``I;16*``, ``I``, ``F``, ``RGBA``, ``LA``,
        ``P``, ``PA``, ``CMYK``, ``YCbCr``, ...

    Returns
    -------
    PIL.Image.Image
        ``RGB`` image of the same size ``(W, H)``.

    Notes
    -----
    * 16-bit greyscale (``I;16``, ``I;16B``, ...) and 32-bit ``I`` are scaled from the
      16-bit range 0..65535 to 0..255 (``round(v * 255 / 65535)``); Pillow's own
      ``convert("L")`` clips instead, which turns almost every 16-bit image white.
      ``I`` is assumed to hold 16-bit data (what Pillow gives for 16-bit PNG/TIFF).
    * ``F`` (float) is assumed to be in 0..255 and is clipped.
    * Transparent modes (``RGBA``, ``LA``, ``PA``, ``P`` with transparency) are composited
      on white rather than having their alpha dropped (dropping it exposes arbitrary colour
      under fully transparent pixels).
    """
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(im).astype(np.int64)
        values = np.clip(values, 0, 65535)
        # Integer round-half-up of v * 255 / 65535 keeps 0 -> 0 and 65535 -> 255 exactly.
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        # Palette images go through RGBA so a transparent palette index becomes white.
        return _white_composite(im.convert("RGBA"))
    return im.convert("RGB")


def upright(im: Image.Image) -> Image.Image:
    """``im`` rotated / mirrored as its EXIF orientation tag says (the tag removed).

    An image without the tag comes back unchanged; unreadable EXIF data is ignored (the
    orientation is then unknown, and the pixels are used as stored).
    """
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # malformed EXIF block: Pillow raises various types
        return im
    if orientation in (None, 1):
        return im
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


def open_rgb(path: str | os.PathLike[str], *, expect_sha256: str | None = None) -> Image.Image:
    """Open and fully decode one image file as 8-bit RGB, upright (EXIF orientation).

    Parameters
    ----------
    path : path-like
        Image file.
    expect_sha256 : str, optional
        SHA-256 the file's bytes must have: the file is read once, hashed and decoded from
        those bytes, so what is decoded is exactly what was hashed (the capture cache keys
        shards by content; a file rewritten during a run must not slip under its old key).

    Returns
    -------
    PIL.Image.Image
        Decoded ``RGB`` image, detached from the file.

    Raises
    ------
    ImageError
        If the file is missing or unreadable, not an image, truncated/corrupt, larger than
        ``PIL.Image.MAX_IMAGE_PIXELS`` allows (decompression bomb guard), or its content
        is not ``expect_sha256``.
    """
    path = Path(path)
    try:
        source: Path | io.BytesIO = path
        if expect_sha256 is not None:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != expect_sha256:
                raise ImageError(
                    f"image {path} changed on disk during the run (its content is not what "
                    "was read when the run started): rerun once nothing writes to the "
                    "image folder any more")
            source = io.BytesIO(data)
        with Image.open(source) as im:
            im.load()
            return to_rgb(upright(im))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"image {path} is too large to decode safely ({exc}); if the file is trusted, "
            "raise PIL.Image.MAX_IMAGE_PIXELS before loading, otherwise remove the file"
        ) from exc
    except FileNotFoundError as exc:
        raise ImageError(
            f"image {path} does not exist: check the path (or reload the dataset with "
            "load_dataset() if its files were moved)"
        ) from exc
    except PIL_ERRORS as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # Pillow's own have none
            raise ImageError(f"cannot read image {path} ({exc.strerror or exc}): check that "
                             "the file is readable and its disk is mounted") from exc
        raise ImageError(
            f"cannot decode image {path} ({type(exc).__name__}: {exc}); replace or delete "
            "the file, or reload with load_dataset(..., verify=True) to skip it up front"
        ) from exc


def image_problem(path: str | os.PathLike) -> str | None:
    """Why an image file cannot be used, or None. Cheaper than decoding every file.

    ``PIL.Image.verify`` checks headers (and PNG chunk checksums) but not JPEG scan data,
    so a truncated JPEG passes it and fails hours later in the middle of a capture. Here a
    JPEG must also end with its end-of-image marker (within the last 4 KiB, so trailers
    are allowed), else it is decoded fully; formats other than PNG and JPEG (whose
    ``verify`` checks little) are always decoded fully.
    """

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "unreadable image (empty file: 0 bytes)"
        with Image.open(path) as im:
            fmt = im.format
            im.verify()
        if fmt == "PNG":
            return None
        if fmt in ("JPEG", "MPO"):
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 4096))
                if b"\xff\xd9" in f.read():
                    return None
        with Image.open(path) as im:  # verify() leaves the file unusable: reopen
            im.load()
    except Image.DecompressionBombError as exc:
        return f"image too large (decompression bomb guard): {exc}"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"unreadable image ({type(exc).__name__}: {exc})"
    return None
