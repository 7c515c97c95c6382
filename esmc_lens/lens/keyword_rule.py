"""Which vocabulary tokens score a criterion keyword in the logit lens: the one keyword rule.

The lens at a cell is a distribution over the *next token*, so a keyword is scored by the
tokens that can begin it. The rule, applied to each keyword ``w``:

1. Its *surface forms* are ``w`` as given, lower-cased and capitalised, each with and
   without a leading space (``" red"``, ``"red"``, ``" Red"``, ``"Red"``); a bare
   leading-space token (SentencePiece's ``"▁"`` before ``"red"``) is skipped.
2. If any surface form is **one token** (a whole word of the vocabulary), the keyword's
   probability is the sum of the probabilities of those whole-word tokens, each distinct
   id counted once, and nothing else: ``"sunflower"`` is never scored by ``" sun"`` when
   ``" sunflower"`` exists.
3. Only when **no** surface form is one token is the keyword scored by the first pieces of
   its split forms, and only by a piece that says most of the keyword: at least
   ``MIN_PIECE_CHARS`` (3) letters, at least half of the keyword's letters, and not a
   common word (scikit-learn's ``ENGLISH_STOP_WORDS``). ``" the"`` (of "theater"),
   ``" be"`` (of "beige"), ``" sun"`` (of "sunflowers") or ``" C"`` (of "carnation")
   begin thousands of words and say nothing about the keyword; ``" tul"`` of "tulip" does.
   Such keywords are listed in ``multi_token``.
4. A keyword with no such token, or that encodes to the unknown token, cannot be scored:
   :func:`keyword_token_ids` raises ``ConfigError`` naming it, and :func:`split_scorable`
   separates such words from a list beforehand.

Two keywords that share a token get the same score for it: reported in ``clashes``.
:func:`esmc_lens.validate.keyword_notes` turns a :class:`KeywordTokens` into the warnings
a run prints; it applies this rule, not a second one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from ..errors import ConfigError
from .tokens import decode_each


@dataclass
class KeywordTokens:
    """Token ids that score each keyword (see the module docstring), and what the rule had
    to compromise on."""

    keywords: list[str]
    groups: list[list[int]]  # ids summed for keyword j
    multi_token: list[str]  # keywords no surface form of which is one token (rule 3)
    clashes: dict[int, list[str]]  # token id shared by several keywords
    pieces: dict[str, list[str]] = field(default_factory=dict)  # keyword -> scoring tokens


MIN_PIECE_CHARS = 3  # shortest first piece of a split keyword that scores it


def _variants(keyword: str) -> list[str]:
    w = keyword.strip()
    forms = dict.fromkeys([w, w.lower(), w[:1].upper() + w[1:]])
    return [p + f for f in forms for p in (" ", "")]


def _is_common(piece: str) -> bool:
    return piece.lower() in ENGLISH_STOP_WORDS


def _scoring_ids(tokenizer, keyword: str) -> tuple[list[int], bool]:
    """(ids that score ``keyword``, whether they are whole-word tokens): rules 1-3."""
    unk = getattr(tokenizer, "unk_token_id", None)
    whole: list[int] = []
    pieces: list[int] = []
    for v in _variants(keyword):
        toks = tokenizer.encode(v, add_special_tokens=False)
        words = [t for t in toks if tokenizer.decode([t]).strip()]
        if not words or (unk is not None and unk in words):
            continue
        if len(words) == 1:
            if words[0] not in whole:
                whole.append(words[0])
            continue
        piece = tokenizer.decode([words[0]]).strip()
        letters = sum(ch.isalpha() for ch in keyword)
        if (len(piece) >= MIN_PIECE_CHARS and 2 * len(piece) >= letters and piece.isalpha()
                and not _is_common(piece) and words[0] not in pieces):
            pieces.append(words[0])
    return (whole, True) if whole else (pieces, False)


def split_scorable(tokenizer, keywords: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(scorable, unscorable)`` keywords under the rule, in their given order."""
    ok, bad = [], []
    for kw in keywords:
        (ok if isinstance(kw, str) and kw.strip() and _scoring_ids(tokenizer, kw)[0]
         else bad).append(kw)
    return ok, bad


def keyword_token_ids(tokenizer, keywords: Sequence[str]) -> KeywordTokens:
    """Apply the keyword rule (module docstring) to ``keywords``."""
    groups, multi, owners, shown = [], [], {}, {}
    cleaned, unscorable = [], []
    for kw in keywords:
        if not isinstance(kw, str) or not kw.strip():
            raise ConfigError(f"keyword {kw!r} is empty: give words such as 'red', 'white'")
        ids, whole = _scoring_ids(tokenizer, kw)
        if not ids:
            unscorable.append(kw.strip())
            continue
        if not whole:
            multi.append(kw.strip())
        for t in ids:
            owners.setdefault(t, []).append(kw.strip())
        groups.append(ids)
        cleaned.append(kw.strip())
        shown[kw.strip()] = decode_each(tokenizer, ids)
    if unscorable:
        raise ConfigError(
            f"keywords {unscorable} cannot be scored by the lens: no surface form is one "
            f"token of the vocabulary and no first piece of >= {MIN_PIECE_CHARS} letters covers "
            "half of the keyword without being a common word (see "
            "esmc_lens.lens.keyword_rule); drop them or use other single words")
    clashes = {t: o for t, o in owners.items() if len(set(o)) > 1}
    return KeywordTokens(cleaned, groups, multi, clashes, shown)
