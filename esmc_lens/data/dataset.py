"""Loader for datasets in the ESMC layout ``<dataset>/<criterion>/<class>/<image>``.

Every criterion folder is one labelling of the images. The same image appears, under the
same file NAME, below every criterion that labels it, so labellings are joined by file name.
An image may be labelled for some criteria only; its other labels are missing (reported,
never dropped). The class is the FIRST folder below the criterion; deeper sub-folders
(``manufacturer/BMW/BMW 3 Series 2012/x.jpg``) only organise files within that class.

Images are opened lazily and always returned as 8-bit RGB ``PIL.Image.Image``.
``PIL.Image.MAX_IMAGE_PIXELS`` is left at Pillow's default so decompression bombs raise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..errors import DataError
from .images import image_problem, open_rgb

__all__ = ["IMAGE_EXTENSIONS", "ImageDataset", "load_dataset"]

#: File extensions (lower case) treated as images; everything else is skipped and reported.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

# Name of the column holding the image path; a criterion may not use it.
_PATH_COLUMN = "path"


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _visible_subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))


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

    def open(self, i_or_name: int | np.integer | str) -> Image.Image:
        """Open one image as 8-bit RGB.

        Parameters
        ----------
        i_or_name : int or str
            Position in ``names`` or the image name.

        Returns
        -------
        PIL.Image.Image
            ``RGB`` image.

        Raises
        ------
        DataError
            Unknown name or index out of range.
        ImageError
            The file cannot be decoded (message names the path).
        """
        return open_rgb(self._path_of(i_or_name))

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
            yield [(n, open_rgb(p)) for n, p in batch]

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
            skipped=self.skipped.copy(),
        )


def _walk_files(folder: Path) -> list[Path]:
    """All non-hidden files below ``folder`` (recursively), sorted, hidden folders pruned."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        found.extend(Path(dirpath) / f for f in filenames if not _is_hidden(f))
    return sorted(found)


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
        criterion named ``path``, or one file name under two classes of one criterion.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist; check the path")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is a file; pass the dataset folder instead")

    skipped: list[tuple[str, str]] = []
    all_criteria = [p.name for p in _visible_subdirs(root)]
    for p in sorted(root.iterdir()):
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

    label_of: dict[str, dict[str, str]] = {}  # criterion -> name -> class
    first_path: dict[str, str] = {}  # name -> path, first criterion (sorted) wins
    classes: dict[str, list[str]] = {}
    for crit in chosen:
        crit_dir = root / crit
        class_dirs = _visible_subdirs(crit_dir)
        for p in sorted(crit_dir.iterdir()):
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
            for path in _walk_files(class_dir):
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    skipped.append((str(path), f"not an image (extension '{path.suffix}')"))
                    continue
                if verify:
                    reason = image_problem(path)
                    if reason is not None:
                        skipped.append((str(path), reason))
                        continue
                name = path.name
                if name in labels:
                    if labels[name] != class_dir.name:
                        raise DataError(
                            f"conflicting labels for image {name!r} under criterion {crit!r}: "
                            f"class {labels[name]!r} ({where[name]}) and class "
                            f"{class_dir.name!r} ({path}); keep the file in one class only"
                        )
                    skipped.append(
                        (str(path), f"duplicate of {where[name]} in class '{class_dir.name}'")
                    )
                    continue
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
    skipped_frame = pd.DataFrame(sorted(skipped), columns=["path", "reason"], dtype=object)
    return ImageDataset(
        root=root, labels=frame, criteria=list(chosen), classes=classes, skipped=skipped_frame
    )
