"""Which vocabulary tokens score a criterion keyword in the logit lens.

A keyword's lens probability is the sum of the probabilities of the tokens that start its
surface variants: with and without a leading space, lower-case and capitalised
(``" red"``, ``"red"``, ``" Red"``, ``"Red"``), each distinct token id counted once; a
variant that the tokenizer starts with a bare space token (``"▁"`` + ``"red"``) is scored by
its first non-blank token. The lens predicts one next token, so a variant that splits into
several tokens can only be scored by its first piece, and a short piece says little: with
SmolLM2, ``"carnation"`` starts with ``" C"`` and ``"daisy"`` with ``"D"``, tokens that
begin thousands of words. So a variant's first piece counts only if it is a whole variant
(one token) or at least ``MIN_PIECE_CHARS`` (3) characters long; a keyword with no such
token is scored by its longest first pieces. :func:`keyword_token_ids` reports keywords
none of whose variants is a single token in ``multi_token``; two keywords sharing a token
get the same score, which is reported as a clash.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass
class KeywordTokens:
    """Token ids that score each keyword, and what the rule had to compromise on."""

    keywords: list[str]
    groups: list[list[int]]  # ids summed for keyword j
    multi_token: list[str]  # keywords scored by the first of several tokens
    clashes: dict[int, list[str]]  # first-token id shared by several keywords


MIN_PIECE_CHARS = 3  # shortest first piece of a split keyword that scores it


def _variants(keyword: str) -> list[str]:
    w = keyword.strip()
    forms = dict.fromkeys([w, w.lower(), w[:1].upper() + w[1:]])
    return [p + f for f in forms for p in (" ", "")]


def keyword_token_ids(tokenizer, keywords: Sequence[str]) -> KeywordTokens:
    """Apply the documented keyword rule (module docstring) to ``keywords``."""
    groups, multi, owners = [], [], {}
    cleaned = []
    for kw in keywords:
        if not isinstance(kw, str) or not kw.strip():
            raise ConfigError(f"keyword {kw!r} is empty: give words such as 'red', 'white'")
        ids, pieces, single = [], {}, False
        for v in _variants(kw):
            toks = tokenizer.encode(v, add_special_tokens=False)
            # SentencePiece encodes " red" as ["▁", "red"] for some words: skip bare spaces.
            words = [t for t in toks if tokenizer.decode([t]).strip()]
            first = words[0] if words else (toks[0] if toks else None)
            if first is None:
                continue
            if len(words) <= 1:  # the whole variant is one token
                single = True
                if first not in ids:
                    ids.append(first)
            else:
                pieces.setdefault(first, len(tokenizer.decode([first]).strip()))
        # first pieces of split variants: only long ones (see "Keyword rule"), or, when
        # nothing else scores the keyword, its longest ones
        longest = max(pieces.values(), default=0)
        floor = MIN_PIECE_CHARS if ids or longest >= MIN_PIECE_CHARS else longest
        ids += [t for t, n in pieces.items() if n >= floor and t not in ids]
        if not single:  # no surface form is one token: scored by first pieces
            multi.append(kw.strip())
        if not ids:
            raise ConfigError(f"keyword {kw!r} encodes to no token in this tokenizer")
        for t in ids:
            owners.setdefault(t, []).append(kw.strip())
        groups.append(ids)
        cleaned.append(kw.strip())
    clashes = {t: o for t, o in owners.items() if len(set(o)) > 1}
    return KeywordTokens(cleaned, groups, multi, clashes)
