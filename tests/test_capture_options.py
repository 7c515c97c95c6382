"""CaptureOptions: one object for what a capture keeps, the same for every entry point."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_cache, solid

from esmc_lens.errors import ConfigError
from esmc_lens.residual.capture import capture
from esmc_lens.residual.options import CaptureOptions
from esmc_lens.residual.store import cache_key, cached_capture

PROMPT = "The color of the object is"


def test_options_are_normalised_so_equal_captures_have_equal_keys():
    a = CaptureOptions.of(layers=[3, 0, 3], keywords=["red", "blue"])
    assert a.layers == (0, 3) and a.keywords == ("red", "blue")
    assert a == CaptureOptions(layers=(0, 3), keywords=("red", "blue"))
    assert CaptureOptions.of(keywords=[]).keywords is None  # no keywords is no keywords
    assert CaptureOptions.of(a, top_k=2) == CaptureOptions(layers=(0, 3),
                                                           keywords=("red", "blue"), top_k=2)
    assert a.key_doc() == {"positions": "prompt", "layers": [0, 3], "store_dtype": "float16",
                           "keywords": ["red", "blue"], "top_k": 0, "vision": False}


@pytest.mark.parametrize(("fields", "message"), [
    ({"layers": 3}, "give stream indices"),
    ({"layers": [True]}, "give stream indices"),
    ({"keywords": "red"}, "give a list of words"),
    ({"store_dtype": "float16"}, "give a torch dtype"),
    ({"top_k": -1}, "must be an int >= 0"),
    ({"batch": 4}, r"unknown capture options \['batch'\]"),
])
def test_bad_options_name_the_option_and_the_fix(fields, message):
    with pytest.raises(ConfigError, match=message):
        CaptureOptions.of(**fields)


def test_an_options_object_and_its_fields_capture_the_same(tiny_vlm, tmp_path):
    images = [solid((220, 20, 30), (32, 32)), solid((20, 30, 220), (32, 32))]
    opts = CaptureOptions(keywords=("red", "blue"), top_k=3, vision=True,
                          store_dtype=torch.float32, layers=(0, 2))
    fields = {"keywords": ["red", "blue"], "top_k": 3, "vision": True,
              "store_dtype": torch.float32, "layers": [2, 0]}
    # the same shapes through the same kernels: bit for bit
    assert_same_cache(capture(tiny_vlm, images, PROMPT, opts, progress=False),
                      capture(tiny_vlm, images, PROMPT, progress=False, **fields))
    assert cache_key(tiny_vlm, [PROMPT], 2, opts) == cache_key(tiny_vlm, [PROMPT], 2, **fields)
    first = cached_capture(tiny_vlm, images, PROMPT, tmp_path, opts, batch_size=2,
                           progress=False)
    again = cached_capture(tiny_vlm, images, PROMPT, tmp_path, batch_size=2, progress=False,
                           **fields)
    assert again.meta["capture_cache"]["loaded"] == 1  # the object's entry, found by fields
    assert_same_cache(first, again)
    assert list(first.stream) == [0, 2]
