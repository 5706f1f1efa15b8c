"""Frozen ImageNet backbones and the per-stage pooling in front of the flows.

Backbones are timm models named with an explicit weight tag: ``wide_resnet50_2.tv_in1k`` and
``resnet18.tv_in1k`` are the torchvision V1 weights that the official MSFlow and CFlow code load
(timm's untagged default for these architectures is a different weight set). The official code
also pads every 3x3 convolution and the 7x7 stem by reflection instead of zeros; that is the
default here (``padding_mode="reflect"``), ``"zeros"`` gives the stock timm network.

The backbone is never trained, so it always runs in eval mode under ``torch.no_grad()``: no
autograd graph is built through it (the official code does build one and throws it away). Its
outputs depend only on the image and on ``FeatureExtractor.cache_key()``, so they can be cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from harness.errors import ConfigError
from harness.weights import create_model, input_convention

POOLS = ("avg", "max", "none")
PADDING_MODES = ("reflect", "zeros")


def weights_label(pretrained: bool, weights_path: Path | None, model: nn.Module | None = None) -> str:
    """How a frozen model's weights are named in feature cache keys and run records: the label of
    the weights it was built with (harness.weights), which names the source and its file hash."""
    source = getattr(model, "weight_source", None)
    if source is not None:
        return source.label
    if not pretrained:
        return "random"
    return f"file:{weights_path.name}" if weights_path is not None else "pretrained"


def _use_reflect_padding(backbone: nn.Module) -> None:
    """Pad every 3x3 conv and the 7x7 stem conv by reflection (the stem max-pool keeps its padding)."""
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size in ((3, 3), (7, 7)):
            module.padding_mode = "reflect"


def create_backbone(
    name: str = "wide_resnet50_2.tv_in1k",
    stages: Sequence[int] = (1, 2, 3),
    pretrained: bool = True,
    padding_mode: str = "reflect",
    weights_path: str | Path | None = None,
) -> nn.Module:
    """A frozen, eval-mode timm backbone whose forward(x) returns the feature maps of ``stages``
    (for ResNets: 1 = layer1 at stride 4, 2 = layer2, 3 = layer3, 4 = layer4).

    pretrained=True loads the weights of the source configured for ``name`` (harness.weights: the
    Hugging Face Hub cache by default), or from ``weights_path`` when given. Raises HarnessError
    with instructions when they cannot be loaded.
    """
    if padding_mode not in PADDING_MODES:
        raise ConfigError(f"backbone padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    backbone = create_frozen_model(name, pretrained, weights_path, features_only=True, out_indices=tuple(stages))
    if padding_mode == "reflect":
        _use_reflect_padding(backbone)
    return backbone


def _stage_pool(pool: str, kernel: int) -> nn.Module:
    if pool == "avg":  # count_include_pad=True, as PyTorch's default and the official code
        return nn.AvgPool2d(kernel, stride=2, padding=kernel // 2)
    if pool == "max":
        return nn.MaxPool2d(kernel, stride=2, padding=kernel // 2)
    if pool == "none":
        return nn.Identity()
    raise ConfigError(f"feature pool must be one of {POOLS}, got {pool!r}")


class FeatureExtractor(nn.Module):
    """Frozen backbone + the same pooling on every stage map. forward(x) -> list of [B, C_l, h_l, w_l]."""

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        stages: Sequence[int] = (1, 2, 3),
        pool: str = "avg",
        pool_kernel: int = 3,
        pretrained: bool = True,
        padding_mode: str = "reflect",
        weights_path: str | Path | None = None,
    ):
        super().__init__()
        self.backbone_name = backbone
        self.stages = tuple(stages)
        self.pool_type = pool
        self.pool_kernel = pool_kernel
        self.pretrained = pretrained
        self.padding_mode = padding_mode
        self.weights_path = Path(weights_path) if weights_path is not None else None
        self.pool = _stage_pool(pool, pool_kernel)
        self.backbone = create_backbone(backbone, self.stages, pretrained, padding_mode, weights_path)
        self.inputs = input_convention(self.backbone)  # e.g. [-1, 1] for TF EfficientNet-Lite
        self.channels: list[int] = list(self.backbone.feature_info.channels())
        self.strides: list[int] = list(self.backbone.feature_info.reduction())  # before pooling

    def train(self, mode: bool = True) -> FeatureExtractor:
        super().train(mode)
        self.backbone.eval()  # BatchNorm keeps its ImageNet running statistics
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        return [self.pool(feature) for feature in self.backbone(self.inputs(images))]

    def cache_key(self) -> str:
        """Everything the features depend on, apart from the image."""
        pool = self.pool_type if self.pool_type == "none" else f"{self.pool_type}{self.pool_kernel}"
        weights = weights_label(self.pretrained, self.weights_path, self.backbone)
        stages = ",".join(map(str, self.stages))
        return f"{self.backbone_name}|stages={stages}|pool={pool}|pad={self.padding_mode}|weights={weights}"


def create_frozen_model(
    name: str,
    pretrained: bool = True,
    weights_path: str | Path | None = None,
    **kwargs,
) -> nn.Module:
    """A frozen, eval-mode timm model of any architecture, whole (not ``features_only``), for
    feature extractors that read intermediate blocks themselves: ViT/DeiT/CaiT token maps
    (FastFlow, U-Flow), one EfficientNet block stage (CS-Flow). ``kwargs`` go to
    ``timm.create_model`` (e.g. ``img_size``). Weights come from the source configured for
    ``name`` (harness.weights: an explicit tag from the Hugging Face Hub cache, a local file, a
    package) or from ``weights_path``; HarnessError with instructions when they cannot be loaded.
    ``model.weight_source`` names the weights used."""
    architecture = name.partition(".")[0]
    if not timm.is_model(architecture):
        raise ConfigError(f"unknown backbone {name!r}: timm has no architecture {architecture!r}")
    source = str(Path(weights_path).expanduser()) if pretrained and weights_path is not None else None
    model = create_model(name, pretrained, source=source, **kwargs)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
