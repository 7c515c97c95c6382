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
    "OutputError",
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


class OutputError(EsmcError):
    """A run's output folder cannot be written, or a saved run cannot be read back."""


class EsmcWarning(UserWarning):
    """Something was skipped, recomputed or approximated; the run goes on (see the message)."""


#: errno values that mean "no space": a full disk and an exceeded quota.
_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT


def write_failure(exc: BaseException) -> tuple[str, bool] | None:
    """``(reason, disk full?)`` of a failed write, or None if ``exc`` is not one.

    Knows ``OSError`` and safetensors' ``SafetensorError`` (which reports the OS error only
    in its text, "... (os error 28)"), so callers catch both with one rule.
    """
    import re

    if isinstance(exc, OSError):
        return (exc.strerror or str(exc)), exc.errno in _FULL_ERRNOS
    if type(exc).__name__ == "SafetensorError":
        text = " ".join(str(exc).split())
        if "os error" not in text.lower() and "i/o error" not in text.lower():
            return None
        m = re.search(r"os error (\d+)", text)
        return text, bool(m) and int(m.group(1)) in _FULL_ERRNOS
    return None
