"""Token ids as text: every place that shows a lens token decodes it here."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["decode_each", "token_strings"]


def decode_each(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each id decoded on its own (``" color"``): what the lens puts at a cell."""
    return [tokenizer.decode([int(i)]) for i in ids]


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Raw token strings (``Ġcolor``) where the tokenizer gives them, else decoded text."""
    conv = getattr(tokenizer, "convert_ids_to_tokens", None)
    if conv is not None:
        out = conv([int(i) for i in ids])
        if all(isinstance(t, str) for t in out):
            return out
    return decode_each(tokenizer, ids)
