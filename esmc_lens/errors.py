"""Exception classes of esmc_lens.

Every message names the offending path or value and says how to fix it, so a failure in
a long pipeline run can be acted on without reading the traceback.
"""

from __future__ import annotations

__all__ = [
    "CaptureError",
    "ConfigError",
    "DataError",
    "EsmcError",
    "EsmcWarning",
    "ImageError",
    "ModelError",
    "WeightsError",
]


class EsmcError(Exception):
    """Base class of all errors raised by esmc_lens."""


class DataError(EsmcError, ValueError):
    """A dataset on disk (or a request about it) is malformed.

    Subclasses ``ValueError`` so callers that already catch bad-input errors keep working.
    """


class ImageError(DataError):
    """One image file cannot be opened or decoded."""


class ConfigError(EsmcError, ValueError):
    """An argument (prompt, positions, keyword, k, alpha, tau, ...) is out of range."""


class ModelError(EsmcError):
    """A model cannot be loaded or does not have the layout esmc_lens needs."""


class WeightsError(ModelError):
    """The offline model's weights cannot be fetched or converted."""


class CaptureError(EsmcError):
    """A capture cannot be run, stored or read back."""


class EsmcWarning(UserWarning):
    """Something was skipped, recomputed or approximated; the run goes on (see the message)."""
