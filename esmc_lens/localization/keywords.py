"""Criterion keywords: the input of keyword-vote localization (paper §3.1, Algorithm 1).

The paper asks GPT-4 "What are common car colors? Provide the answer with single words."
and uses the answer's words ("black", "white", "blue", ...) to find the (layer, position)
whose logit lens puts probability on them. Here keywords come from three sources, each
recorded per word so a table of results says where a keyword came from:

* ``"user"``: typed by the user (:func:`user_keywords`);
* ``"lm"``: the answer of the model's own *language model*, asked text-only
  (:func:`lm_keywords`; no external LLM is reachable offline);
* ``"class_names"``: a labelled dataset's class names (:func:`class_name_keywords`), for
  diagnostics only: using ground-truth names makes localization supervised.

>>> kw = merge(user_keywords("red, white"), class_name_keywords(ds, "color"))  # doctest: +SKIP
>>> capture(vlm, images, "The color of the flower is", keywords=kw)            # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch

from ..errors import ConfigError, EsmcWarning
from ..lens.keyword_rule import split_scorable
from ..validate import KEYWORD_SOURCES

if TYPE_CHECKING:
    from ..models.vlm import VLM

__all__ = [
    "SOURCES",
    "STOP_WORDS",
    "Keywords",
    "class_name_keywords",
    "default_question",
    "lm_keywords",
    "merge",
    "parse_keywords",
    "user_keywords",
]

SOURCES = ("user", "lm", "class_names")
MAX_WORD_LEN = 20  # longer "words" are run-ons or garbage, not keywords

# Function words and list filler a chat model wraps its answer in ("The most common colors
# include ..."). Content words echoing the question are dropped separately (``exclude``).
_STOP_TEXT = """
a about all also an and answer any are as at be been being both but by can certainly come
comes common commonly could do does each either etc even every example examples few for
found from generally has have here how however i in include includes including into is it
its just kind kinds like list main many may more most much my neither no nor not of often on
one or other others our popular several shade shades should single so some such sure than
that the their them then there these they this those to type types typical typically
usually various very was we well were what which while who will with word words would you
your
"""
STOP_WORDS = frozenset(_STOP_TEXT.split())

_NUMBERING = re.compile(r"^\s*(?:\(?\d+[.):]|\(?[a-z][.)]\s|[-*•·–—+])\s*", re.IGNORECASE)
_SEPARATORS = re.compile(r"[,;/|]|\s+-\s+|\s+[–—]\s+|\s+(?:and|or)\s+", re.IGNORECASE)
_DESCRIPTION = re.compile(r":|\s+[-–—]\s+")  # "Red: warm", "Red - warm" in a list item
_WORD = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*")  # letters, inner ' or -
_WORD_STRIP = "\"'`*_()[]{}<>.,:;!?¡¿«»“”‘’"


@dataclass
class Keywords:
    """Criterion keywords and where each one came from.

    Attributes
    ----------
    words : list of str, length K
        The keywords, in order of preference (first = most trusted source).
    sources : list of str, length K
        ``"user"``, ``"lm"`` or ``"class_names"`` for each word.
    raw : str or None
        The language model's unparsed answer (for ``"lm"`` keywords), else None.
    question : str or None
        The question the language model was asked, if any.
    truncated : bool
        The language model's answer hit its token cap; its last, possibly cut, item was
        dropped.

    Iterating a ``Keywords`` yields its words, so it can be passed wherever a list of
    keywords is expected (``capture(..., keywords=kw)``).
    """

    words: list[str]
    sources: list[str]
    raw: str | None = None
    question: str | None = None
    truncated: bool = False  # the LM's answer hit its token cap (its last item was dropped)

    def __post_init__(self) -> None:
        self.words = [str(w) for w in self.words]
        self.sources = [str(s) for s in self.sources]
        if len(self.words) != len(self.sources):
            raise ConfigError(f"{len(self.words)} keywords but {len(self.sources)} sources: "
                              "give one source per word")
        bad = sorted(set(self.sources) - set(SOURCES))
        if bad:
            raise ConfigError(f"unknown keyword sources {bad}: use {SOURCES}")

    def __len__(self) -> int:
        return len(self.words)

    def __iter__(self) -> Iterator[str]:
        return iter(self.words)

    def __getitem__(self, i: int) -> str:
        return self.words[i]

    @property
    def supervised(self) -> bool:
        """True when any keyword is a class name: localization then used the labels."""
        return "class_names" in self.sources

    def to_frame(self) -> pd.DataFrame:
        """One row per keyword: columns ``word`` and ``source`` (shape [K, 2])."""
        return pd.DataFrame({"word": self.words, "source": self.sources})


def merge(*kws: Keywords) -> Keywords:
    """Concatenate keyword sets, dropping case-insensitive repeats (the first one wins).

    The raw answers of the ``"lm"`` inputs, if any, are joined into ``raw``.
    """
    words: list[str] = []
    sources: list[str] = []
    seen: set[str] = set()
    for kw in kws:
        for w, s in zip(kw.words, kw.sources, strict=True):
            key = w.strip().lower()
            if key and key not in seen:
                seen.add(key)
                words.append(w)
                sources.append(s)
    raws = [k.raw for k in kws if k.raw]
    questions = [k.question for k in kws if k.question]
    return Keywords(words, sources, raw="\n---\n".join(raws) if raws else None,
                    question="\n".join(questions) if questions else None)


def user_keywords(words: str | Iterable[str]) -> Keywords:
    """Keywords typed by the user: a list, or one string separated by commas/newlines.

    Words keep their spelling (multi-word entries such as ``"light blue"`` are allowed:
    the lens scores a keyword by its first token, see :mod:`esmc_lens.lens.unembed`); empty
    entries and case-insensitive repeats are dropped.
    """
    items = re.split(r"[,\n;]", words) if isinstance(words, str) else list(words)
    if any(not isinstance(w, str) for w in items):
        raise ConfigError(f"keywords must be strings, got {items!r}")
    out = _dedupe(w.strip() for w in items if w.strip())
    if not out:
        raise ConfigError(f"no keywords in {words!r}: give words such as 'red, white, pink'")
    return Keywords(out, ["user"] * len(out))


def class_name_keywords(dataset, criterion: str) -> Keywords:
    """A dataset's class names of ``criterion`` as keywords (source ``"class_names"``).

    Parameters
    ----------
    dataset : :class:`~esmc_lens.data.dataset.ImageDataset` (anything with ``.classes`` mapping a
        criterion to its class names).
    criterion : str
        e.g. ``"color"``.

    Notes
    -----
    These are ground-truth names: localizing with them uses the labels, so report results
    obtained this way as supervised (useful as an upper bound and for naming checks).
    """
    classes = getattr(dataset, "classes", None)
    if not isinstance(classes, dict) or criterion not in classes:
        known = sorted(classes) if isinstance(classes, dict) else "none"
        raise ConfigError(f"dataset has no criterion {criterion!r}; criteria: {known}")
    out = _dedupe(str(c).strip() for c in classes[criterion] if str(c).strip())
    return Keywords(out, ["class_names"] * len(out))


def _plural(noun: str) -> str:
    n = noun.strip()
    low = n.lower()
    if low.endswith("s"):
        return n  # "species", "colors": already plural or invariant
    if low.endswith("y") and len(low) > 1 and low[-2] not in "aeiou":
        return n[:-1] + "ies"
    if low.endswith(("sh", "ch", "x", "z")):
        return n + "es"
    return n + "s"


def default_question(criterion_noun: str, object_noun: str) -> str:
    """The keyword question for a criterion, e.g. ``("color", "flower")`` ->
    ``"What are common colors of flowers? Answer with single words."``

    Both nouns are pluralised naively (``-s``, ``-ies``, ``-es``; words already ending in
    ``s`` are kept); pass plurals yourself for irregular nouns.
    """
    for name, v in (("criterion_noun", criterion_noun), ("object_noun", object_noun)):
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{name}={v!r} is empty: give a noun such as 'color', 'flower'")
    return (f"What are common {_plural(criterion_noun)} of {_plural(object_noun)}? "
            "Answer with single words.")


def _clean_word(w: str) -> str:
    return w.strip().strip(_WORD_STRIP).strip("-–—").lower()


def _norm(w: str) -> str:
    # Crude singular so "flower" in an answer matches "flowers" in the question.
    return w[:-1] if len(w) > 3 and w.endswith("s") else w


def parse_keywords(text: str, exclude: Iterable[str] = ()) -> list[str]:
    """Single lower-case keywords from a language model's free-text answer.

    Rule, applied line by line:

    1. a list item (``"1."``, ``"2)"``, ``"-"``, ``"*"``, ``"•"`` at the line start) keeps
       only its name: the marker and anything after a ``":"`` or a spaced dash (a
       description) are cut;
    2. any other line keeps only what follows its last ``":"`` (the lead-in "The most
       common colors are:" is cut; a line ending in ``":"`` is a heading and is dropped);
    3. the rest is split on commas, semicolons, slashes, spaced dashes, "and"/"or" and
       whitespace into words; surrounding punctuation is stripped and words are lower-cased;
    4. dropped: stop-words (:data:`STOP_WORDS`), words of ``exclude`` (the question's own
       words, compared with a trailing "s" removed), words shorter than 2 or longer than
       20 characters, and anything that is not letters (with inner ``-`` or ``'``);
    5. repeats are removed, first occurrence order kept.

    Examples
    --------
    >>> parse_keywords("The most common colors of flowers are: Red, Blue, White, and Green.")
    ['red', 'blue', 'white', 'green']
    >>> parse_keywords("1. Rose\\n2. Tulip: a spring bulb\\n3. Daisy")
    ['rose', 'tulip', 'daisy']
    """
    excluded = {_norm(_clean_word(w)) for w in exclude}
    words: list[str] = []
    for line in text.splitlines():
        marker = _NUMBERING.match(line)
        if marker:
            line = _DESCRIPTION.split(line[marker.end():])[0]
        elif ":" in line:
            line = line.rsplit(":", 1)[1]
        for item in _SEPARATORS.split(line):
            for w in item.split():
                w = _clean_word(w)
                if (len(w) < 2 or len(w) > MAX_WORD_LEN or w in STOP_WORDS
                        or _norm(w) in excluded or not _WORD.fullmatch(w)):
                    continue
                words.append(w)
    return _dedupe(words)


def _dedupe(words: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for w in words:
        if w.lower() not in seen:
            seen.add(w.lower())
            out.append(w)
    return out


def text_prompt(vlm, question: str) -> str:
    """The chat-formatted text-only prompt (no image placeholder) for ``question``."""
    messages = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    template_owner = (vlm.processor if getattr(vlm.processor, "chat_template", None)
                      else vlm.tokenizer)
    if not getattr(template_owner, "chat_template", None):
        return question  # a base LM without a template: ask plainly
    return template_owner.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=False)


@torch.inference_mode()
def lm_keywords(vlm, question: str, max_new_tokens: int = 64,
                exclude_question_words: bool = True) -> Keywords:
    """Ask the VLM's language model ``question`` (text only, greedy) and parse its answer.

    Parameters
    ----------
    vlm : :class:`~esmc_lens.models.vlm.VLM`
    question : str
        e.g. ``default_question("color", "flower")``.
    max_new_tokens : int
        Cap on the answer's length; the model normally stops earlier, at its
        end-of-sequence token (a list of ~10 words needs ~40 tokens). An answer cut by the
        cap loses its last item (``truncated``).
    exclude_question_words : bool
        Drop words the question itself contains ("colors", "flowers", ...), which chat
        models echo in their lead-in.

    Returns
    -------
    Keywords
        Source ``"lm"``; ``raw`` holds the unparsed answer, ``question`` the question.

    Notes
    -----
    No image is given: ``LlavaForConditionalGeneration.generate`` without ``pixel_values``
    runs its language model alone on the chat template's text-only user turn. The answer
    of a small model can be wrong or empty; check ``raw`` and merge with user keywords.
    """
    if not isinstance(question, str) or not question.strip():
        raise ConfigError(f"question={question!r} is empty; e.g. "
                          f"{default_question('color', 'flower')!r}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
    tok = vlm.tokenizer
    text = text_prompt(vlm, question)
    # Add BOS like the processor would, unless the template already wrote it.
    bos = tok.bos_token
    enc = tok(text, return_tensors="pt", add_special_tokens=not (bos and text.startswith(bos)))
    out = vlm.model.generate(input_ids=enc["input_ids"].to(vlm.device),
                             attention_mask=enc["attention_mask"].to(vlm.device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:]
    raw = tok.decode(new, skip_special_tokens=True).strip()
    # The answer ends at the end-of-sequence token; without it the cap cut the answer, and
    # its last item may be a fragment ("vol" of "Volvo"): drop that item.
    eos = vlm.model.generation_config.eos_token_id
    stops = {tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    truncated = len(new) >= max_new_tokens and not stops & set(new.tolist())
    exclude = re.findall(r"[^\W\d_]+", question) if exclude_question_words else ()
    words = parse_keywords(raw, exclude=exclude)
    if truncated and words and not raw.rstrip().endswith((".", "\n")):
        words = words[:-1]
    return Keywords(words, ["lm"] * len(words), raw=raw, question=question,
                    truncated=truncated)


def as_keyword_list(keywords: Keywords | Sequence[str] | str) -> list[str]:
    """Plain list of keyword strings from a ``Keywords``, a list or a comma string."""
    if isinstance(keywords, Keywords):
        return list(keywords.words)
    if isinstance(keywords, str):
        return user_keywords(keywords).words
    return [str(w) for w in keywords]


_PROMPT_RE = re.compile(r"(?:the\s+)?(\w+)\s+of\s+(?:the|this|a|an)\s+(\w+)", re.IGNORECASE)


def question_for_prompt(prompt: str) -> str | None:
    """The keyword question for a criterion prompt ("The color of the flower is" ->
    "What are common colors of flowers? ..."), or None when the prompt has no
    "<criterion> of the <object>" phrase."""
    m = _PROMPT_RE.search(prompt)
    return default_question(m.group(1).lower(), m.group(2).lower()) if m else None


CLASS_NAMES = "class-names"  # what a user types (--keywords class-names) to ask for them
MIN_KEYWORDS = 2  # fewer usable LM keywords than this is a failed answer


def choose_keywords(vlm: VLM, prompt: str, keywords=None, images=None,
                    criterion: str | None = None, source: str = "auto") -> Keywords:
    """Keywords for localization, label-free unless the user asks otherwise.

    ``source="auto"`` (the default): the user's ``keywords`` if given, else the local
    language model's answer to the question built from the prompt
    (:func:`question_for_prompt`); if that yields fewer than ``MIN_KEYWORDS`` keywords the
    lens can score, ``ConfigError`` names both ways out. The dataset's class names are
    used only when asked for (``source="class_names"``, or ``keywords="class-names"``):
    they are the labels, so localization with them is *supervised*, and every result of
    such a run says so (:attr:`esmc_lens.report.result.EsmcResult.supervised`).
    Keywords the lens cannot score (:func:`esmc_lens.lens.keyword_rule.split_scorable`)
    are dropped from the user's and the LM's lists, with an ``EsmcWarning``.
    """
    import warnings

    if source not in KEYWORD_SOURCES:
        raise ConfigError(f"keyword_source={source!r}: use one of {KEYWORD_SOURCES}")
    if isinstance(keywords, str) and keywords.strip().lower() in (CLASS_NAMES, "class_names"):
        keywords, source = None, "class_names"
    if source == "class_names":
        if criterion is None or images is None:
            raise ConfigError("keyword_source='class_names' needs a dataset and its criterion "
                              "(the class-folder names are the keywords)")
        return class_name_keywords(images, criterion)
    if source == "user" and keywords is None:
        raise ConfigError("keyword_source='user' needs keywords=[...] (--keywords a,b,c)")
    if keywords is not None and source in ("auto", "user"):
        kw = keywords if isinstance(keywords, Keywords) else user_keywords(keywords)
    else:
        q = question_for_prompt(prompt)
        if q is None:
            raise ConfigError(
                f"no keywords for {prompt!r}: it has no '<criterion> of the <object>' phrase "
                "to ask the language model about. Pass keywords (--keywords red,white,pink), "
                f"or localize with the dataset's class names (--keywords {CLASS_NAMES}; "
                "supervised)")
        kw = lm_keywords(vlm, q)
    ok, bad = split_scorable(vlm.tokenizer, kw.words)
    if bad:
        warnings.warn(f"keywords {bad} cannot be scored by the lens (see "
                      "esmc_lens.lens.keyword_rule) and are dropped", EsmcWarning, stacklevel=3)
        keep = [w in ok for w in kw.words]
        kw = Keywords([w for w, k in zip(kw.words, keep, strict=True) if k],
                      [s for s, k in zip(kw.sources, keep, strict=True) if k],
                      raw=kw.raw, question=kw.question, truncated=kw.truncated)
    if len(kw.words) < (MIN_KEYWORDS if "lm" in kw.sources else 1):
        got = f"the language model's answer {kw.raw!r} to {kw.question!r}" if kw.raw is not \
            None or kw.question else "the keyword list"
        raise ConfigError(
            f"{got} gave {len(kw.words)} usable keyword(s) {kw.words}: pass keywords "
            f"(--keywords red,white,pink), or localize with the dataset's class names "
            f"(--keywords {CLASS_NAMES}; supervised)")
    return kw
