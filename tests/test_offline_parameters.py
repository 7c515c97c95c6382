"""Every hand-set number of the offline model equals its documented source, recomputed here.

No weights are needed: the colour reader and the foreground rule are pure functions of the
pixels and of the constants (EfficientNet is built with random weights and never run).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import SOLID_COLOURS

from esmc_lens.models import offline as om

# ISCC-NBS centroid colours (Kelly & Judd 1976, NBS Special Publication 440), sRGB form as
# in Kelly's 1965 colours of maximum contrast and Jaffer's "nbs-iscc" dictionary:
# category number -> (category name, sRGB hex).
ISCC_NBS = {
    1: ("vivid pink", "#FFB5BA"), 11: ("vivid red", "#BE0032"),
    48: ("vivid orange", "#F38400"), 55: ("strong brown", "#80461B"),
    82: ("vivid yellow", "#F3C300"), 139: ("vivid green", "#008856"),
    176: ("vivid blue", "#00A1C2"), 216: ("vivid purple", "#9A4EAE"),
    263: ("white", "#F2F3F4"), 265: ("medium gray", "#848482"), 267: ("black", "#222222"),
}
# The rule: "vivid <term>" (brown: "strong brown", its most saturated block); the neutrals
# white, medium gray, black.
RULE = {"black": 267, "white": 263, "red": 11, "green": 139, "yellow": 82, "blue": 176,
        "brown": 55, "purple": 216, "pink": 1, "orange": 48, "gray": 265}


def lab_reference(rgb255: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of 8-bit sRGB, written from IEC 61966-2-1 and CIE 15 (float64)."""
    c = np.asarray(rgb255, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                  [0.0193, 0.1192, 0.9505]])
    t = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(t > eps, np.cbrt(t), (kappa * t + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


def test_lab_reference_matches_published_values():
    # sRGB red, white, mid gray in CIELAB D65 (the commonly tabulated values, computed with
    # more digits of the matrix than the standard's 4: within 0.05)
    np.testing.assert_allclose(lab_reference([255, 0, 0]), [53.24, 80.09, 67.20], atol=0.05)
    np.testing.assert_allclose(lab_reference([255, 255, 255]), [100.0, 0.0, 0.0], atol=0.02)
    np.testing.assert_allclose(lab_reference([128, 128, 128])[0], 53.585, atol=0.01)


def test_colour_prototypes_are_the_iscc_nbs_centroids():
    expected = {t: (ISCC_NBS[n][0], n, ISCC_NBS[n][1]) for t, n in RULE.items()}
    assert expected == om.COLOUR_CENTROIDS
    assert list(om.COLOUR_TERMS) == list(RULE)  # the order of the colour tokens' mixture
    for term, (_, _, code) in expected.items():
        assert om.COLOUR_TERMS[term] == tuple(int(code[i:i + 2], 16) for i in (1, 3, 5))
    ref = lab_reference(np.array(list(om.COLOUR_TERMS.values())))
    np.testing.assert_allclose(om.prototype_lab().numpy(), ref, rtol=0, atol=1e-9)
    tower = om.OfflineVisionTower()
    np.testing.assert_allclose(tower.colour_lab.numpy(), ref, rtol=0, atol=1e-4)  # fp32


def test_colour_sigma_is_half_the_closest_prototype_distance():
    ref = lab_reference(np.array(list(om.COLOUR_TERMS.values())))
    d = np.linalg.norm(ref[:, None] - ref[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    i, j = np.unravel_index(d.argmin(), d.shape)
    assert {list(om.COLOUR_TERMS)[i], list(om.COLOUR_TERMS)[j]} == {"white", "pink"}
    sigma = om.COLOUR_SIGMA_LAB
    assert sigma == pytest.approx(d.min() / 2, abs=1e-9)
    assert sigma == pytest.approx(16.384, abs=1e-3)


def _pixels(rgb, size=224) -> torch.Tensor:
    """The processor's pixel_values of a solid image: (x - 127) / 128, [1, 3, size, size]."""
    x = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size)
    return (x - 127) / 128


def test_solid_colours_are_read_by_the_documented_rule():
    """Each pixel votes softmax(-dE^2 / (2 sigma^2)) over the prototypes. The tests' solid
    blue (30, 60, 200), a near-primary sRGB blue, lies nearer in CIELAB to ISCC-NBS vivid
    purple (dE 39.0) than to vivid blue: the reader calls it purple (a known CIELAB hue bend
    in the blues), and does not hide it."""
    tower = om.OfflineVisionTower()
    ref = lab_reference(np.array(list(om.COLOUR_TERMS.values())))
    names = list(om.COLOUR_TERMS)
    read = {}
    for name, rgb in SOLID_COLOURS.items():
        d2 = ((lab_reference(np.array(rgb)) - ref) ** 2).sum(-1)
        w = np.exp(-(d2 - d2.min()) / (2 * om.COLOUR_SIGMA_LAB**2))
        # one pixel per patch: the vote itself, fp32 against float64
        one = tower.colour_posteriors(_pixels(rgb, 7))[0]  # [49, 11]
        np.testing.assert_allclose(one.numpy(), np.tile(w / w.sum(), (49, 1)), atol=1e-6)
        # 32 x 32 pixels per patch: the fp32 mean of 1024 votes, within 1e-4
        post = tower.colour_posteriors(_pixels(rgb))[0]
        np.testing.assert_allclose(post.numpy(), np.tile(w / w.sum(), (49, 1)), atol=1e-4)
        read[name] = names[int(post[0].argmax())]
    assert read == {"red": "red", "green": "green", "blue": "purple", "yellow": "yellow",
                    "white": "white", "black": "black"}
    # each prototype is read as its own term
    for term, rgb in om.COLOUR_TERMS.items():
        assert names[int(tower.colour_posteriors(_pixels(rgb, 32))[0, 0].argmax())] == term


def test_foreground_threshold_follows_from_its_definition():
    """Nothing stands out (a uniform image) -> the image's colours; one inner patch of a new
    colour (excess 1/25) -> exactly that colour. The threshold lies between the two."""
    assert 1e-6 < om.FOREGROUND_MIN_EXCESS < 1 / 25
    base = torch.tensor([0.7, 0.2, 0.1])
    uniform = base.expand(1, 49, 3).clone()
    # (the fp32 mean of 49 equal values rounds: within 1e-6)
    torch.testing.assert_close(om.foreground_colours(uniform), base[None], rtol=0, atol=1e-6)
    one = uniform.clone()
    one[0, 3 * 7 + 3] = torch.tensor([0.0, 0.0, 1.0])  # the centre patch
    fg = om.foreground_colours(one)
    torch.testing.assert_close(fg, torch.tensor([[0.0, 0.0, 1.0]]), rtol=0, atol=1e-6)
    assert om.N_FOREGROUND == om.GRID and om.CLASSIFIER_TEMPERATURE == 1.0


def test_parameters_name_the_cache_folder_and_are_recorded_in_the_config(monkeypatch):
    """A model built with other constants lives in another folder, and its config (which
    the capture cache's key hashes) differs: an old cache is never read as the new model."""
    from transformers import LlamaConfig

    doc = json.dumps(om.PARAMETERS, sort_keys=True, separators=(",", ":"))
    sha = hashlib.sha256(doc.encode()).hexdigest()
    assert om.offline_dir().name == f"offline-v{om.OFFLINE_VERSION}-{sha[:12]}"
    assert om.OFFLINE_VERSION == "3"
    cfg = om._llava_config(LlamaConfig(hidden_size=8, intermediate_size=8,
                                      num_hidden_layers=1, num_attention_heads=1,
                                      num_key_value_heads=1, vocab_size=32))
    recorded = cfg.esmc_offline["parameters"]
    assert recorded["colour_centroids"]["blue"] == ["vivid blue", 176, "#00A1C2"]
    assert recorded["colour_sigma_lab"] == round(om.COLOUR_SIGMA_LAB, 6)
    before = om.offline_dir()
    monkeypatch.setitem(om.PARAMETERS, "colour_sigma_lab", 18.0)
    assert om.offline_dir() != before
