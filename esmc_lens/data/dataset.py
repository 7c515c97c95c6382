"""Loader for datasets in the ESMC layout ``<dataset>/<criterion>/<class>/<image>``.

Every criterion folder is one labelling of the images. The same image appears, under the
same file NAME, below every criterion that labels it, so labellings are joined by file name.
An image may be labelled for some criteria only; its other labels are missing (reported,
never dropped). The class is the FIRST folder below the criterion; deeper sub-folders
(``manufacturer/BMW/BMW 3 Series 2012/x.jpg``) only organise files within that class.

Images are opened lazily and always returned as 8-bit RGB ``PIL.Image.Image``, turned
upright by their EXIF orientation tag. ``PIL.Image.MAX_IMAGE_PIXELS`` is left at Pillow's
default so decompression bombs raise.

Rules for what real folders hold:

* **Names**: the join key is the file name in Unicode NFC form, so a name written in NFD
  (macOS) under one criterion and NFC under another is one image.
* **Same name twice**: the contents are compared (SHA-256, after a size check). The same
  bytes are one image (a second copy in the same class is listed as a duplicate); different
  bytes under one name are refused with a ``DataError`` naming both files, whether they sit
  in one class, in two classes or under two criteria: criteria are joined by name, so a
  name must be one image.
* **Symbolic links** are followed, to folders and to files, at every level (criterion,
  class, sub-folder). A link to a folder that contains the folder being walked (a loop) is
  not followed; it, broken links, folders that cannot be listed and files that are not
  regular files are listed in ``skipped`` with the reason.
* Hidden entries (``.name``) are ignored; so are the metadata folders that archive tools
  and NAS boxes add (``__MACOSX``, ``@eaDir``, ``$RECYCLE.BIN``, ``System Volume
  Information``), which are listed in ``skipped``.
* Each image's size and modification time are recorded at load; ``ImageDataset.open``
  refuses a file that changed since (``ImageError``: reload the dataset).
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..errors import DataError, ImageError
from .images import image_problem, open_rgb

__all__ = ["IMAGE_EXTENSIONS", "ImageDataset", "load_dataset"]

#: File extensions (lower case) treated as images; everything else is skipped and reported.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

# Name of the column holding the image path; a criterion may not use it.
_PATH_COLUMN = "path"


# Folders that tools add beside the data (zip on macOS, Synology thumbnails, Windows).
SYSTEM_FOLDERS: frozenset[str] = frozenset(
    {"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information"})


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise DataError(f"cannot list folder {folder} ({exc.strerror or exc}): check its "
                        "permissions and that its disk is mounted") from None


def _visible_subdirs(folder: Path, skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    out = []
    for p in _listdir(folder):
        if _is_hidden(p.name) or not p.is_dir():
            continue
        if p.name in SYSTEM_FOLDERS:
            if skipped is not None:
                skipped.append((str(p), "system metadata folder (not data)"))
            continue
        out.append(p)
    return out


def name_key(name: str) -> str:
    """The join key of a file name: its Unicode NFC form."""
    return unicodedata.normalize("NFC", name)


@dataclass
class ImageDataset:
    """Images of one ESMC dataset with their labels under every criterion.

    Attributes
    ----------
    root : pathlib.Path
        Dataset folder.
    labels : pandas.DataFrame
        Shape ``(n_images, n_criteria + 1)``. Index ``name`` = image file name (sorted);
        one categorical column per criterion (missing label = NaN); column ``path`` = path
        (str) of the first readable file found for that name.
    criteria : list of str
        Criterion names, in column order.
    classes : dict of str to list of str
        Sorted class names per criterion; ``y(criterion)`` codes index into these.
    skipped : pandas.DataFrame
        Columns ``path`` and ``reason``: every file or folder that was not used, and why.
    """

    root: Path
    labels: pd.DataFrame
    criteria: list[str]
    classes: dict[str, list[str]]
    skipped: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame({"path": [], "reason": []}, dtype=object)
    )
    #: path -> (size, mtime in ns) at load; ``open`` refuses a file that changed since.
    file_stats: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(root={str(self.root)!r}, n_images={len(self)}, "
            f"criteria={self.criteria}, n_skipped={len(self.skipped)})"
        )

    @property
    def names(self) -> list[str]:
        """Image names (index of ``labels``), length ``n_images``."""
        return [str(n) for n in self.labels.index]

    @property
    def paths(self) -> list[Path]:
        """Image paths, length ``n_images``, aligned with ``names``."""
        return [Path(p) for p in self.labels[_PATH_COLUMN]]

    def _path_of(self, i_or_name: int | np.integer | str) -> Path:
        if isinstance(i_or_name, str):
            if i_or_name not in self.labels.index:
                raise DataError(
                    f"no image named {i_or_name!r} in dataset {self.root}; use one of "
                    "ImageDataset.names"
                )
            return Path(self.labels.at[i_or_name, _PATH_COLUMN])
        if isinstance(i_or_name, (int, np.integer)) and not isinstance(i_or_name, bool):
            n = len(self)
            if not -n <= int(i_or_name) < n:
                raise DataError(
                    f"image index {int(i_or_name)} out of range for dataset {self.root} "
                    f"with {n} images; use 0 <= i < {n}"
                )
            return Path(self.labels[_PATH_COLUMN].iloc[int(i_or_name)])
        raise TypeError(f"expected an int index or a str name, got {type(i_or_name).__name__}")

    def open(self, i_or_name: int | np.integer | str, *,
             expect_sha256: str | None = None) -> Image.Image:
        """Open one image as 8-bit RGB, upright (EXIF orientation).

        Parameters
        ----------
        i_or_name : int or str
            Position in ``names`` or the image name.
        expect_sha256 : str, optional
            The SHA-256 its bytes must have (see :func:`~esmc_lens.data.images.open_rgb`).

        Returns
        -------
        PIL.Image.Image
            ``RGB`` image.

        Raises
        ------
        DataError
            Unknown name or index out of range.
        ImageError
            The file cannot be decoded, or changed since the dataset was loaded (the
            message names the path).
        """
        path = self._path_of(i_or_name)
        before = self.file_stats.get(str(path))
        if before is not None:
            try:
                st = path.stat()
                now = (st.st_size, st.st_mtime_ns)
            except OSError:
                now = None  # missing: open_rgb names it
            if now is not None and now != before:
                raise ImageError(
                    f"image {path} changed on disk since the dataset was loaded (size or "
                    "modification time differ): reload it with load_dataset() and run "
                    "again once nothing writes to the folder")
        return open_rgb(path, expect_sha256=expect_sha256)

    def iter_images(self, batch_size: int = 32) -> Iterator[list[tuple[str, Image.Image]]]:
        """Yield the images lazily in batches, in ``names`` order.

        Only one batch is held in memory at a time.

        Parameters
        ----------
        batch_size : int
            Images per batch (>= 1); the last batch may be shorter.

        Yields
        ------
        list of (str, PIL.Image.Image)
            ``(name, RGB image)`` pairs.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        names = self.names
        paths = self.paths
        for start in range(0, len(names), int(batch_size)):
            stop = start + int(batch_size)
            batch = zip(names[start:stop], paths[start:stop], strict=True)
            yield [(n, self.open(n)) for n, p in batch]

    def _check_criterion(self, criterion: str) -> None:
        if criterion not in self.criteria:
            raise DataError(
                f"unknown criterion {criterion!r} for dataset {self.root}; available: "
                f"{self.criteria}"
            )

    def y(self, criterion: str) -> np.ndarray:
        """Integer class codes of one criterion.

        Parameters
        ----------
        criterion : str
            Criterion name.

        Returns
        -------
        numpy.ndarray of int64, shape (n_images,)
            Index into ``classes[criterion]``, ``-1`` where the label is missing.
        """
        self._check_criterion(criterion)
        return np.asarray(self.labels[criterion].cat.codes, dtype=np.int64)

    def class_counts(self, criterion: str) -> pd.Series:
        """Number of images per class of one criterion.

        Returns
        -------
        pandas.Series of int, shape (n_classes,)
            Indexed by class name, in ``classes[criterion]`` order.
        """
        self._check_criterion(criterion)
        counts = self.labels[criterion].value_counts(sort=False, dropna=True)
        counts = counts.reindex(self.classes[criterion], fill_value=0).astype(np.int64)
        counts.index.name = criterion
        counts.name = "count"
        return counts

    def report(self) -> pd.DataFrame:
        """Per-criterion label counts.

        Returns
        -------
        pandas.DataFrame, shape (n_criteria, 3)
            Index ``criterion``; columns ``n_labelled``, ``n_missing``, ``n_classes``.
            Per-class counts: ``class_counts(criterion)``.
        """
        rows = []
        for c in self.criteria:
            n_labelled = int(self.labels[c].notna().sum())
            rows.append(
                {
                    "criterion": c,
                    "n_labelled": n_labelled,
                    "n_missing": len(self) - n_labelled,
                    "n_classes": len(self.classes[c]),
                }
            )
        frame = pd.DataFrame(rows, columns=["criterion", "n_labelled", "n_missing", "n_classes"])
        return frame.set_index("criterion")

    def subset(self, names: Iterable[str]) -> ImageDataset:
        """Dataset restricted to the given images, in the given order.

        ``classes`` are kept whole so ``y`` codes stay comparable with the parent dataset.

        Parameters
        ----------
        names : iterable of str
            Image names, each at most once.

        Returns
        -------
        ImageDataset
        """
        if isinstance(names, str):
            raise TypeError("names must be an iterable of image names, not a single str")
        wanted = list(names)
        unknown = [n for n in wanted if n not in self.labels.index]
        if unknown:
            raise DataError(
                f"{len(unknown)} name(s) not in dataset {self.root}, e.g. {unknown[:3]}; "
                "use names from ImageDataset.names"
            )
        if len(set(wanted)) != len(wanted):
            raise DataError("subset() got repeated image names; pass each name once")
        return ImageDataset(
            root=self.root,
            labels=self.labels.loc[wanted].copy(),
            criteria=list(self.criteria),
            classes={c: list(v) for c, v in self.classes.items()},
            skipped=self.skipped.copy(), file_stats=dict(self.file_stats),
        )


def walk_files(folder: Path, skipped: list[tuple[str, str]]) -> list[Path]:
    """All non-hidden regular files below ``folder``, sorted; links followed, loops not.

    A link to a folder is followed unless that folder contains (or is) a folder on the
    current walk: following it would come back to where it started. Loops, broken links,
    unlistable folders and non-regular files (FIFOs, devices) go to ``skipped``.
    """
    found: list[Path] = []
    todo = [(folder, (Path(os.path.realpath(folder)),))]
    while todo:
        d, chain = todo.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            skipped.append((str(d), f"folder cannot be listed ({exc.strerror or exc})"))
            continue
        for e in entries:
            if _is_hidden(e.name):
                continue
            p = Path(e.path)
            try:
                is_dir, is_file = e.is_dir(), e.is_file()  # both follow links
            except OSError:
                is_dir = is_file = False
            if is_dir:
                if e.name in SYSTEM_FOLDERS:
                    skipped.append((str(p), "system metadata folder (not data)"))
                    continue
                real = Path(os.path.realpath(p))
                if any(real == c or real in c.parents for c in chain):
                    skipped.append((str(p), f"symbolic link loop (-> {real}): not followed"))
                    continue
                todo.append((p, (*chain, real)))
            elif is_file:
                found.append(p)
            elif e.is_symlink() and not p.exists():
                skipped.append((str(p), f"broken symbolic link (-> {os.readlink(p)})"))
            else:
                skipped.append((str(p), "not a regular file"))
    return sorted(found)


class _Contents:
    """Are two files the same image? Same file, else same size and SHA-256 (memoised)."""

    def __init__(self) -> None:
        self._sha: dict[str, str] = {}

    def sha(self, path: Path) -> str:
        key = str(path)
        if key not in self._sha:
            h = hashlib.sha256()
            try:
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
            except OSError as exc:
                raise DataError(f"cannot read image {path} ({exc.strerror or exc})") from None
            self._sha[key] = h.hexdigest()
        return self._sha[key]

    def same(self, a: Path, b: Path) -> bool:
        try:
            if os.path.samefile(a, b):
                return True
            if a.stat().st_size != b.stat().st_size:
                return False
        except OSError:
            return False
        return self.sha(a) == self.sha(b)


def _different_images(name: str, a: Path, b: Path, where: str) -> DataError:
    return DataError(
        f"two different images are named {name!r} {where}: {a} and {b}; criteria are "
        "joined by file name, so one name must be one image: rename one of them (or "
        "replace it with a copy of the other if they are meant to be the same image)")


def load_dataset(
    root: str | os.PathLike[str],
    criteria: Sequence[str] | None = None,
    *,
    verify: bool = True,
) -> ImageDataset:
    """Load an ESMC-layout dataset ``<root>/<criterion>/<class>/[...]/<image>``.

    Parameters
    ----------
    root : path-like
        Dataset folder; each non-hidden sub-folder is a criterion.
    criteria : sequence of str, optional
        Criteria to load (default: all, sorted). Images labelled only under other criteria
        are left out.
    verify : bool, default True
        Check every image file's structure up front with ``PIL.Image.verify`` (header and
        chunk checks, no pixel decoding) and list unreadable ones in ``skipped``. With
        ``False`` only the extension is checked and bad files surface as ``ImageError``
        from ``ImageDataset.open``.

    Returns
    -------
    ImageDataset
        Images sorted by file name.

    Raises
    ------
    DataError
        ``root`` missing or not a folder, no criterion folders, an unknown requested
        criterion, a criterion without class folders or without readable images, a
        criterion named ``path``, one file name under two classes of one criterion, or
        one file name holding different images (in one class, or under two criteria).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist; check the path")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is a file; pass the dataset folder instead")

    skipped: list[tuple[str, str]] = []
    all_criteria = [p.name for p in _visible_subdirs(root, skipped)]
    for p in _listdir(root):
        # Only images are reported: a README or manifest beside the criteria is not data.
        if p.is_file() and not _is_hidden(p.name) and p.suffix.lower() in IMAGE_EXTENSIONS:
            skipped.append((str(p), "file outside any criterion folder"))
    if not all_criteria:
        raise DataError(
            f"dataset folder {root} has no criterion folders; expected the layout "
            "<dataset>/<criterion>/<class>/<image>"
        )
    if criteria is None:
        chosen = all_criteria
    else:
        if isinstance(criteria, str):
            criteria = [criteria]
        chosen = list(dict.fromkeys(criteria))
        missing = [c for c in chosen if c not in all_criteria]
        if missing:
            raise DataError(
                f"criteria {missing} not found in {root}; available criteria: {all_criteria}"
            )
    if _PATH_COLUMN in chosen:
        raise DataError(
            f"criterion folder {root / _PATH_COLUMN} clashes with the '{_PATH_COLUMN}' column "
            "of ImageDataset.labels; rename the folder"
        )

    contents = _Contents()
    label_of: dict[str, dict[str, str]] = {}  # criterion -> name -> class
    first_path: dict[str, str] = {}  # name -> path, first criterion (sorted) wins
    classes: dict[str, list[str]] = {}
    for crit in chosen:
        crit_dir = root / crit
        class_dirs = _visible_subdirs(crit_dir, skipped)
        for p in _listdir(crit_dir):
            if p.is_file() and not _is_hidden(p.name):
                skipped.append((str(p), f"file directly under criterion '{crit}', not in a class"))
        if not class_dirs:
            raise DataError(
                f"criterion folder {crit_dir} has no class folders; put each image in "
                f"{crit_dir}/<class>/ or remove the folder"
            )
        labels: dict[str, str] = {}
        where: dict[str, Path] = {}
        crit_classes: list[str] = []
        for class_dir in class_dirs:
            n_used = 0
            for path in walk_files(class_dir, skipped):
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    skipped.append((str(path), f"not an image (extension '{path.suffix}')"))
                    continue
                if verify:
                    reason = image_problem(path)
                    if reason is not None:
                        skipped.append((str(path), reason))
                        continue
                name = name_key(path.name)
                if name in labels:
                    same = contents.same(where[name], path)
                    if labels[name] != class_dir.name:
                        if not same:
                            raise _different_images(name, where[name], path,
                                                    f"under criterion {crit!r}")
                        raise DataError(
                            f"conflicting labels for image {name!r} under criterion {crit!r}: "
                            f"class {labels[name]!r} ({where[name]}) and class "
                            f"{class_dir.name!r} ({path}); keep the file in one class only"
                        )
                    if not same:
                        raise _different_images(name, where[name], path,
                                                f"in class {crit}/{class_dir.name}")
                    skipped.append(
                        (str(path), f"duplicate of {where[name]} in class '{class_dir.name}'")
                    )
                    continue
                if name in first_path and not contents.same(Path(first_path[name]), path):
                    raise _different_images(name, Path(first_path[name]), path,
                                            "under two criteria")
                labels[name] = class_dir.name
                where[name] = path
                first_path.setdefault(name, str(path))
                n_used += 1
            if n_used:
                crit_classes.append(class_dir.name)
            else:
                skipped.append((str(class_dir), "class folder without readable images"))
        if not crit_classes:
            raise DataError(
                f"criterion folder {crit_dir} has no readable images in any class folder; "
                "add images or remove the folder"
            )
        label_of[crit] = labels
        classes[crit] = crit_classes

    names = sorted(first_path)
    index = pd.Index(names, name="name", dtype=object)
    columns = {
        c: pd.Categorical([label_of[c].get(n) for n in names], categories=classes[c])
        for c in chosen
    }
    frame = pd.DataFrame(columns, index=index)
    frame[_PATH_COLUMN] = pd.Series([first_path[n] for n in names], index=index, dtype=object)
    skipped_frame = pd.DataFrame(sorted(set(skipped)), columns=["path", "reason"],
                                 dtype=object)
    stats = {}
    for p in first_path.values():
        try:
            st = os.stat(p)
        except OSError:  # gone already: open() names it
            continue
        stats[p] = (st.st_size, st.st_mtime_ns)
    return ImageDataset(
        root=root, labels=frame, criteria=list(chosen), classes=classes, skipped=skipped_frame,
        file_stats=stats,
    )
