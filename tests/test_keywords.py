"""esmc_lens.localization.keywords: parsing LM answers, sources, merging, text-only questions."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from esmc_lens.errors import ConfigError
from esmc_lens.localization.keywords import (
    Keywords,
    class_name_keywords,
    default_question,
    lm_keywords,
    merge,
    parse_keywords,
    text_prompt,
    user_keywords,
)

FLOWER_Q = "What are common colors of flowers? Answer with single words."
Q_WORDS = re.findall(r"[^\W\d_]+", FLOWER_Q)

# Realistic answers (the first is SmolLM2-135M-Instruct's verbatim; the others are in the
# styles of GPT-4, DeepSeek-R1 and Gemini quoted in the paper's Table 7, or usual chat lists).
PARSE_CASES = [
    ("The most common colors of flowers are: Red, Blue, White, and Green.",
     ["red", "blue", "white", "green"]),
    ("Black, White, Silver, Gray, Red, Blue, Green, Gold, Brown, Beige",
     ["black", "white", "silver", "gray", "red", "blue", "green", "gold", "brown", "beige"]),
    ("White Black Gray Silver Red Blue Green Yellow Orange",
     ["white", "black", "gray", "silver", "red", "blue", "green", "yellow", "orange"]),
    ("Sure! Here are some common flower colors:\n\n1. **Red**\n2. Pink - romantic\n"
     "3. White: classic and pure\n4) Yellow\n- Purple/Violet\n* Orange.",
     ["red", "pink", "white", "yellow", "purple", "violet", "orange"]),
    ("Common flower colors include red, pink, yellow and white, as well as light blue.",
     ["red", "pink", "yellow", "white", "light", "blue"]),
    ("Toyota, Ford, Mercedes-Benz, BMW; Audi or Kia.",
     ["toyota", "ford", "mercedes-benz", "bmw", "audi", "kia"]),
    ("1. Red\n2. Red\n3. red\n4. 42\n5. Supercalifragilisticexpialidocious\n6. X",
     ["red"]),
    ("", []),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_keywords_realistic_answers(text: str, expected: list[str]) -> None:
    assert parse_keywords(text, exclude=Q_WORDS) == expected


def test_parse_keywords_question_words_only_dropped_when_excluded() -> None:
    text = "Flowers come in colors: red, white. Flower colors vary."
    # after the last colon of line 1: "red, white. Flower colors vary."
    assert parse_keywords(text) == ["red", "white", "flower", "colors", "vary"]
    assert parse_keywords(text, exclude=Q_WORDS) == ["red", "white", "vary"]


def test_default_question() -> None:
    assert default_question("color", "flower") == FLOWER_Q
    assert default_question("species", "daisy") == (
        "What are common species of daisies? Answer with single words.")
    assert default_question("brand", "cars") == (
        "What are common brands of cars? Answer with single words.")
    with pytest.raises(ConfigError, match="criterion_noun"):
        default_question(" ", "flower")


def test_user_keywords_string_and_list() -> None:
    kw = user_keywords(" red, White,,light blue\nred ")
    assert kw.words == ["red", "White", "light blue"]
    assert kw.sources == ["user"] * 3
    assert user_keywords(["a", "b"]).words == ["a", "b"]
    with pytest.raises(ConfigError, match="no keywords"):
        user_keywords(" , ,")


def test_keywords_frame_and_merge_first_source_wins() -> None:
    a = user_keywords("Red, pink")
    b = Keywords(["red", "white", "PINK", "yellow"], ["lm"] * 4, raw="red white pink yellow")
    c = class_name_keywords(SimpleNamespace(classes={"color": ["white", "purple"]}), "color")
    m = merge(a, b, c)
    assert m.words == ["Red", "pink", "white", "yellow", "purple"]
    assert m.sources == ["user", "user", "lm", "lm", "class_names"]
    assert m.raw == "red white pink yellow"
    df = m.to_frame()
    assert list(df.columns) == ["word", "source"]
    assert df.values.tolist() == [["Red", "user"], ["pink", "user"], ["white", "lm"],
                                  ["yellow", "lm"], ["purple", "class_names"]]
    assert list(m) == m.words and len(m) == 5 and m[2] == "white"


def test_keywords_validation() -> None:
    with pytest.raises(ConfigError, match="sources"):
        Keywords(["a"], [])
    with pytest.raises(ConfigError, match="unknown keyword sources"):
        Keywords(["a"], ["gpt"])
    with pytest.raises(ConfigError, match="no criterion 'shape'"):
        class_name_keywords(SimpleNamespace(classes={"color": ["red"]}), "shape")


def test_class_name_keywords_from_dataset(tmp_path) -> None:
    from esmc_lens.data.dataset import load_dataset
    from esmc_lens.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "syn", n_images=8, seed=0)
    ds = load_dataset(root)
    crit = ds.criteria[0]
    kw = class_name_keywords(ds, crit)
    assert kw.words == list(ds.classes[crit])
    assert set(kw.sources) == {"class_names"}


def test_text_prompt_has_no_image(tiny_vlm) -> None:
    text = text_prompt(tiny_vlm, FLOWER_Q)
    assert text == f"USER: {FLOWER_Q} ASSISTANT:"  # LLaVA-1.5 template, text only
    assert "<image>" not in text


def test_lm_keywords_tiny_runs_text_only(tiny_vlm) -> None:
    # Random weights: the answer is gibberish, but the code path is LLaVA's generate()
    # without pixel_values, and the words must be exactly the parse of the raw answer.
    kw = lm_keywords(tiny_vlm, FLOWER_Q, max_new_tokens=8)
    assert isinstance(kw.raw, str) and kw.question == FLOWER_Q
    assert kw.words == parse_keywords(kw.raw, exclude=Q_WORDS)
    assert set(kw.sources) <= {"lm"}
    again = lm_keywords(tiny_vlm, FLOWER_Q, max_new_tokens=8)
    assert again.raw == kw.raw  # greedy: deterministic
    with pytest.raises(ConfigError, match="empty"):
        lm_keywords(tiny_vlm, "  ")


def test_keywords_object_feeds_capture(tiny_vlm) -> None:
    from conftest import solid

    from esmc_lens.residual.capture import capture

    kw = merge(user_keywords("red"), Keywords(["white", "RED"], ["lm", "lm"]))
    cache = capture(tiny_vlm, [solid((255, 0, 0), (30, 30))], "The color of the image is",
                    keywords=kw, progress=False)
    assert cache.keywords == ["red", "white"]
    assert cache.keyword_probs.shape[-1] == 2


COLOURS = {"red", "green", "blue", "yellow", "white", "black", "pink", "purple", "orange",
           "brown", "gray", "grey", "violet", "gold", "silver", "lavender", "magenta"}


@pytest.mark.slow
def test_lm_keywords_offline_flower_colours(offline_vlm) -> None:
    kw = lm_keywords(offline_vlm, default_question("color", "flower"))
    print("offline LM raw answer:", repr(kw.raw), "->", kw.words)
    assert len(set(kw.words) & COLOURS) >= 3, kw.raw
    assert set(kw.sources) == {"lm"}
