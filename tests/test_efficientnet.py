"""Tests for esmc_lens.models.efficientnet (EfficientNet-Lite0 with real ImageNet weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from esmc_lens.models import weights
from esmc_lens.models.efficientnet import (
    EfficientNetLite0,
    imagenet_class_names,
    load_efficientnet_lite0,
    preprocess,
    short_class_names,
)

DAISY_DIR = SHARED_DATA / "flower" / "species" / "daisy"  # ESMC_DATA, else ../shared

CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup
DAISY = 985


@pytest.fixture(scope="module")
def weights_path():
    return weights.fetch(weights.EFFICIENTNET_LITE0)


@pytest.fixture(scope="module")
def model(weights_path):
    return load_efficientnet_lite0(weights_path)


@pytest.fixture(scope="module")
def class_names():
    return imagenet_class_names(weights.fetch(weights.IMAGENET_SYNSETS),
                                weights.fetch(weights.IMAGENET_LEMMAS))


def _top5(model, images):
    with torch.no_grad():
        return model(preprocess(images)).topk(5, dim=-1).indices


def _skimage(name):
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    return Image.fromarray(getattr(data, name)())


# --- Architecture / API (no weights needed) -------------------------------------------


def test_architecture_shapes_random_init():
    m = EfficientNetLite0().eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        f = m.forward_features(x)
        y = m(x)
    assert f.shape == (2, 1280, 7, 7)
    assert y.shape == (2, 1000)
    assert isinstance(m.classifier_layer, torch.nn.Linear)
    assert m.classifier_layer.in_features == 1280 and m.classifier_layer.out_features == 1000
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, 256, 320)).shape == (1, 1280, 8, 10)
    n_params = sum(p.numel() for p in m.parameters())
    assert 4.6e6 < n_params < 4.7e6  # EfficientNet-Lite0 has ~4.65M parameters


def test_preprocess():
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))
    gray = Image.fromarray(rng.integers(0, 256, (240, 200), dtype=np.uint8))
    x = preprocess([img, gray])
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    assert x.min() >= -127 / 128 - 1e-6 and x.max() <= 128 / 128 + 1e-6
    const = Image.fromarray(np.full((50, 80, 3), 127, dtype=np.uint8))
    assert torch.allclose(preprocess([const], size=32), torch.zeros(1, 3, 32, 32))


# --- Pretrained weights ---------------------------------------------------------------


def test_strict_load_and_eval(model, weights_path):
    assert not model.training
    sd = torch.load(weights_path, map_location="cpu", weights_only=True)
    assert set(sd) == set(model.state_dict())
    for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
        assert bn.eps == 1e-3


def test_forward_equals_pooled_features(model):
    x = preprocess([_skimage("chelsea"), _skimage("coffee")])
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        pooled = model.classifier_layer(feats.mean(dim=(2, 3)))
        per_pos = model.classify_positions(feats)
        manual = model.classifier_layer(feats.permute(0, 2, 3, 1))
    assert feats.shape == (2, 1280, 7, 7)
    assert (feats >= 0).all() and (feats <= 6).all()  # after ReLU6
    torch.testing.assert_close(logits, pooled, rtol=1e-5, atol=1e-5)
    assert per_pos.shape == (2, 7, 7, 1000)
    torch.testing.assert_close(per_pos, manual)
    # linear head: mean of per-position logits == logits of pooled features
    torch.testing.assert_close(per_pos.mean(dim=(1, 2)), logits, rtol=1e-4, atol=1e-4)


def test_class_names(class_names):
    assert len(class_names) == 1000
    short = short_class_names(class_names)
    assert short[0] == "tench"
    assert short[281] == "tabby" and short[282] == "tiger cat" and short[285] == "Egyptian cat"
    assert short[DAISY] == "daisy"
    assert short[504] == "coffee mug" and short[967] == "espresso"
    assert "," in class_names[0]  # full lemma string kept (e.g. "tench, Tinca tinca")


def test_cat(model):
    top5 = _top5(model, [_skimage("chelsea")])[0].tolist()
    assert top5[0] in CAT_CLASSES
    assert set(top5) >= CAT_CLASSES


def test_coffee(model):
    top5 = _top5(model, [_skimage("coffee")])[0].tolist()
    assert top5[0] in COFFEE_CLASSES
    assert len(COFFEE_CLASSES & set(top5)) >= 2


def test_astronaut_plausible(model, class_names):
    top5 = _top5(model, [_skimage("astronaut")])[0].tolist()
    short = short_class_names(class_names)
    plausible = {
        "bobsled", "football helmet", "crash helmet", "go-kart", "jersey", "space shuttle",
        "suit", "military uniform", "barbell", "stretcher", "gas pump", "ski mask", "mask",
    }
    assert plausible & {short[i] for i in top5}


def test_daisies(model):
    from PIL import Image

    files = sorted(DAISY_DIR.glob("*.jpg"))[:8]
    if not files:
        pytest.skip(f"no daisy images under {DAISY_DIR}")
    top5 = _top5(model, [Image.open(f) for f in files])
    in_top5 = (top5 == DAISY).any(dim=1).float().mean().item()
    top1 = (top5[:, 0] == DAISY).float().mean().item()
    assert in_top5 >= 0.75
    assert top1 >= 0.5
