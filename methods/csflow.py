"""CS-Flow: Fully Convolutional Cross-Scale-Flows for Image-based Defect Detection.

M. Rudolph, T. Wehrbein, B. Rosenhahn, B. Wandt, WACV 2022 (arXiv 2110.02855).
Independent re-implementation from the specification in specs/baselines.md section 5.

Method. The image at full, half and quarter size passes through the same frozen EfficientNet-B5
up to its 304-channel stage at stride 32, giving three feature maps (24, 12 and 6 pixels wide at
768 px). One normalizing flow transforms the three maps jointly: four blocks, each a fixed random
channel permutation per scale followed by a two-sided affine coupling applied to all scales at
once. The coupling's subnets are "cross-convolutions": every scale is convolved on its own, and
also receives the hidden features of its neighbours (the coarser one upsampled, the finer one
through a strided convolution), so information flows between scales. Training minimises the
negative log-likelihood of all latents under a standard normal, per latent dimension. The image
score is the mean of z^2 / 2 over all latent entries of all scales.

The paper has no localisation metric. The pixel map here (mean over channels of z^2 on the finest
scale, bilinearly upsampled) is NOT part of the original method: it is the map the U-Flow authors
used to report CS-Flow's pixel AUROC and AUPRO.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import timm
from timm.layers import Conv2dSame
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.errors import ConfigError
from harness.features import create_frozen_model, weights_label
from harness.weights import input_convention
from harness.flows import ChannelPermutation, FlowOutput, ParallelAffineCoupling, seeded_construction
from harness.scoring import AGGREGATIONS, ScoringSpec
from methods.base import MethodConfig, MetaEpochs
from methods.registry import register_method

DOWNSCALE_MODES = ("nearest", "bilinear", "area")



@dataclass
class CSFlowConfig(MethodConfig, MetaEpochs):
    """Every setting of CS-Flow with the official default (specs/baselines.md section in brackets)."""

    label: ClassVar[str] = "CS-Flow"

    # Features [5.1]. The official code reads block 35 of efficientnet_pytorch's EfficientNet-B5
    # (TF-ported AutoAugment weights, TF "same" padding): the last block of the 304-channel stage
    # at stride 32. timm's tf_efficientnet_b5 is the same network with TF padding; its stage
    # blocks[5] ends with that block (blocks 0..35). aa_in1k (timm's port of the TF AutoAugment
    # checkpoint) is our best match for those weights, not verified bit for bit; timm's untagged
    # default would be the Noisy-Student weights, anomalib uses torchvision's efficientnet_b5.
    backbone: str = "tf_efficientnet_b5.aa_in1k"
    block_stage: int = 5  # features = output of backbone.blocks[block_stage]
    n_scales: int = 3  # the image at 1, 1/2, 1/4 of its size
    downscale_mode: str = "nearest"  # F.interpolate's default, as the official code
    input_size: tuple[int, int] = (768, 768)
    # The official code's EfficientNet package (efficientnet_pytorch 0.7.x) fixes TF "same" padding
    # at build time for the network's own input size (456 px for B5) and keeps it at every size;
    # at 768 / 384 / 192 px the stride-2 convolutions of blocks 13 and 27 then pad symmetrically
    # instead of (0, 1) and (1, 2), which moves the feature grid. None = timm's padding, computed
    # for the actual input size.
    static_padding_size: int | None = 456
    # torchvision's Resize (the official transform) on PIL images: PIL's bilinear filter.
    image_resize: str = "bilinear"

    # Flow [5.2]
    kernel_sizes: tuple[int, ...] = (3, 3, 3, 5)  # one coupling block per entry
    hidden_channels: int = 1024
    leaky_slope: float = 0.1
    clamp: float = 3.0

    # Optimisation [5.3]: Adam, constant learning rate, no augmentation.
    lr: float = 2e-4
    adam_eps: float = 1e-4
    weight_decay: float = 1e-5
    grad_clip: float | None = 1.0
    batch_size: int = 16
    meta_epochs: int = 4  # evaluation after every meta-epoch
    sub_epochs: int = 60  # training epochs per meta-epoch: 4 x 60 = 240 epochs
    seed: int = 42  # the official code fixes none; anomalib's CS-Flow table used 42

    # Scoring [5.4]. Image score: mean of z^2 / 2 over all latent entries (official).
    # Pixel map: NOT part of CS-Flow (its paper and code have no pixel metric); "finest" = the
    # U-Flow authors' evaluation: mean_c z^2 of the finest scale, bilinearly upsampled.
    pixel_aggregation: str = "finest"

    def __post_init__(self) -> None:
        for name in ("input_size", "kernel_sizes"):
            setattr(self, name, tuple(getattr(self, name)))
        self._check(self.n_scales >= 1, "n_scales", "at least 1")
        architecture = self.backbone.partition(".")[0]
        self._check(timm.is_model(architecture), "backbone", "a timm EfficientNet, e.g. tf_efficientnet_b5.aa_in1k")
        stride = stage_stride(architecture, self.block_stage)
        # Every scale's map must halve exactly: 768 -> 24 / 12 / 6 with stride 32.
        multiple = stride * 2 ** (self.n_scales - 1)
        self._check(
            len(self.input_size) == 2 and all(s > 0 and s % multiple == 0 for s in self.input_size),
            "input_size",
            f"(height, width), each a multiple of {multiple} (stride {stride} at 1/{2 ** (self.n_scales - 1)} size)",
        )
        self._check(len(self.kernel_sizes) >= 1, "kernel_sizes", "one kernel size per coupling block")
        self._check(all(k >= 1 and k % 2 == 1 for k in self.kernel_sizes), "kernel_sizes", "odd kernel sizes")
        self._check(self.hidden_channels >= 1, "hidden_channels", "at least 1")
        self._check(self.downscale_mode in DOWNSCALE_MODES, "downscale_mode", f"one of {DOWNSCALE_MODES}")
        self._check(self.pixel_aggregation in AGGREGATIONS, "pixel_aggregation", f"one of {AGGREGATIONS}")
        self._check(self.static_padding_size is None or self.static_padding_size > 0, "static_padding_size",
                    "a positive input size (456: EfficientNet-B5's own) or null (timm's padding)")

    def input_size_for(self, class_name: str) -> tuple[int, int]:
        return self.input_size

    def feature_extractor(self, pretrained: bool = True, weights_path: str | Path | None = None) -> nn.Module:
        return MultiScaleEfficientNet(
            self.backbone, self.block_stage, self.n_scales, self.downscale_mode, pretrained, weights_path,
            self.static_padding_size,
        )

    def scoring(self) -> ScoringSpec:
        """Image score: mean of z^2 / 2 over every latent entry (``latent_mean``; exact, see
        harness.scoring). Pixel and PRO maps: ``pixel_aggregation`` (not part of CS-Flow)."""
        return ScoringSpec(
            image_aggregation=self.pixel_aggregation,  # unused by latent_mean; shares the cached map
            pixel_aggregation=self.pixel_aggregation,
            pro_aggregation=self.pixel_aggregation,
            normalisation="image",
            image_reduction="latent_mean",
            align_corners=False,
        )

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            [p for p in params if p.requires_grad], lr=self.lr, eps=self.adam_eps, weight_decay=self.weight_decay
        )

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """Constant learning rate (the loop steps a scheduler once per epoch)."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)


def _constant(epoch: int) -> float:
    return 1.0


# --- features [5.1] ------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def stage_stride(architecture: str, block_stage: int) -> int:
    """Output stride of blocks[block_stage] of a timm EfficientNet, read from an empty (meta) model."""
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False)
    if not hasattr(model, "blocks") or not 0 <= block_stage < len(model.blocks):
        raise ConfigError(
            f"CS-Flow setting block_stage={block_stage}: {architecture} is not a timm EfficientNet "
            "with that block stage"
        )
    stride = 1
    for module in [model.conv_stem, *model.blocks[: block_stage + 1].modules()]:
        if isinstance(module, nn.Conv2d):
            stride *= module.stride[0]
    return stride


def static_same_pads(architecture: str, block_stage: int, build_size: int) -> dict[str, tuple[int, int, int, int]]:
    """The fixed (left, right, top, bottom) zero padding of every dynamically padded convolution
    of the stem and blocks[0 .. block_stage], as efficientnet_pytorch 0.7 computes it once for a
    square input of ``build_size`` px: with the convolution's input size i at that build size,
    output ceil(i / s) and total padding max((out - 1) * s + (k - 1) * d + 1 - i, 0), the smaller
    half on the left / top. Keys are module names of the timm model.

    The input sizes at build size are read by running an empty (meta) copy of the network."""
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False)
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: sizes.__setitem__(name, args[0].shape[-2:]))
        for name, module in model.named_modules() if isinstance(module, Conv2dSame)
    ]
    with torch.no_grad():
        model.blocks[: block_stage + 1](model.bn1(model.conv_stem(torch.empty(1, 3, build_size, build_size,
                                                                            device="meta"))))
    for hook in hooks:
        hook.remove()
    pads = {}
    for name, module in model.named_modules():
        if name not in sizes:
            continue
        totals = []
        for size, k, stride, dilation in zip(sizes[name], module.kernel_size, module.stride, module.dilation):
            out = -(-size // stride)
            totals.append(max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0))
        pad_h, pad_w = totals
        pads[name] = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    return pads


class StaticSamePadConv2d(nn.Module):
    """A convolution with a fixed zero padding (left, right, top, bottom) before it, in place of
    timm's padding computed from every input's size."""

    def __init__(self, conv: nn.Conv2d, pad: tuple[int, int, int, int]):
        super().__init__()
        self.conv = conv
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        return F.conv2d(F.pad(x, self.pad), conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def use_static_same_padding(model: nn.Module, architecture: str, block_stage: int, build_size: int) -> None:
    """Replace the dynamically padded convolutions of ``model`` by ones padded as
    efficientnet_pytorch 0.7 pads them for ``build_size`` (static_same_pads)."""
    for name, pad in static_same_pads(architecture, block_stage, build_size).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, StaticSamePadConv2d(getattr(parent, child), pad))


def stage_channels(model: nn.Module, block_stage: int) -> int:
    """Output channels of ``model.blocks[block_stage]`` (its last BatchNorm's width)."""
    norms = [m for m in model.blocks[block_stage].modules() if isinstance(m, nn.BatchNorm2d)]
    return norms[-1].num_features


class MultiScaleEfficientNet(nn.Module):
    """The image at 1, 1/2, 1/4 ... of its size (downscaled with ``downscale_mode``), each through
    the same frozen EfficientNet: stem, then blocks[0 .. block_stage]. forward -> n_scales maps."""

    def __init__(
        self,
        backbone: str = "tf_efficientnet_b5.aa_in1k",
        block_stage: int = 5,
        n_scales: int = 3,
        downscale_mode: str = "nearest",
        pretrained: bool = True,
        weights_path: str | Path | None = None,
        static_padding_size: int | None = None,
    ):
        super().__init__()
        self.backbone_name = backbone
        self.static_padding_size = static_padding_size
        self.block_stage = block_stage
        self.n_scales = n_scales
        self.downscale_mode = downscale_mode
        self.pretrained = pretrained
        self.weights_path = Path(weights_path) if weights_path is not None else None
        model = create_frozen_model(backbone, pretrained, weights_path)
        if not hasattr(model, "blocks") or not hasattr(model, "conv_stem"):
            raise ConfigError(f"CS-Flow backbone {backbone!r} is not a timm EfficientNet (conv_stem + blocks)")
        if not 0 <= block_stage < len(model.blocks):
            raise ConfigError(
                f"CS-Flow setting block_stage={block_stage}: {backbone} has block stages 0..{len(model.blocks) - 1}"
            )
        if static_padding_size is not None:
            use_static_same_padding(model, backbone.partition(".")[0], block_stage, static_padding_size)
        # The backbone's own input convention first (TF EfficientNet-Lite: [-1, 1]); bn1 includes the activation.
        self.stem = nn.Sequential(input_convention(model), model.conv_stem, model.bn1)
        self.weight_source = getattr(model, "weight_source", None)
        self.blocks = model.blocks[: block_stage + 1]  # the head and later stages are never used
        self.channels: list[int] = [stage_channels(model, block_stage)] * n_scales

    def train(self, mode: bool = True) -> MultiScaleEfficientNet:
        super().train(mode)
        self.stem.eval()
        self.blocks.eval()  # BatchNorm keeps its ImageNet statistics, no drop-path
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        height, width = images.shape[-2:]
        features = []
        for scale in range(self.n_scales):
            x = images
            if scale:
                size = (height // 2**scale, width // 2**scale)
                x = F.interpolate(images, size=size, mode=self.downscale_mode)
            features.append(self.blocks(self.stem(x)))
        return features

    def cache_key(self) -> str:
        weights = weights_label(self.pretrained, self.weights_path, self)
        padding = "dynamic" if self.static_padding_size is None else f"static{self.static_padding_size}"
        return (
            f"{self.backbone_name}|blocks=0-{self.block_stage}|scales={self.n_scales}"
            f"|down={self.downscale_mode}|pad={padding}|weights={weights}"
        )


# --- flow [5.2] ----------------------------------------------------------------------------------


class CrossConvolutions(nn.Module):
    """The coupling subnet of CS-Flow, over scales ordered finest first.

    Per scale: conv(k) in -> hidden, LeakyReLU; conv(k) hidden -> out. Between neighbours: the
    coarser hidden map, upsampled x2 (bilinear), through conv(k) -> added to the finer output; the
    finer hidden map through a stride-2 conv(k) -> added to the coarser output. Each scale's sum is
    multiplied by a learnable scalar initialised to 0, so every block starts as the identity.
    Zero padding k // 2, biases everywhere, PyTorch's default initialisation.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        hidden: int = 1024,
        kernel_size: int = 3,
        leaky_slope: float = 0.1,
    ):
        super().__init__()
        pad = kernel_size // 2
        pairs = len(in_channels) - 1
        self.inner = nn.ModuleList(nn.Conv2d(c, hidden, kernel_size, padding=pad) for c in in_channels)
        self.outer = nn.ModuleList(nn.Conv2d(hidden, c, kernel_size, padding=pad) for c in out_channels)
        # from_coarser[i]: scale i+1 -> scale i; from_finer[i]: scale i -> scale i+1
        self.from_coarser = nn.ModuleList(
            nn.Conv2d(hidden, out_channels[i], kernel_size, padding=pad) for i in range(pairs)
        )
        self.from_finer = nn.ModuleList(
            nn.Conv2d(hidden, out_channels[i + 1], kernel_size, stride=2, padding=pad) for i in range(pairs)
        )
        self.gammas = nn.ParameterList(nn.Parameter(torch.zeros(1)) for _ in in_channels)
        self.activation = nn.LeakyReLU(leaky_slope)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        hidden = [self.activation(conv(x)) for conv, x in zip(self.inner, xs)]
        out = [conv(h) for conv, h in zip(self.outer, hidden)]
        for i in range(len(xs) - 1):
            upsampled = F.interpolate(hidden[i + 1], size=hidden[i].shape[-2:], mode="bilinear", align_corners=False)
            out[i] = out[i] + self.from_coarser[i](upsampled)
            out[i + 1] = out[i + 1] + self.from_finer[i](hidden[i])
        return [o * gamma for o, gamma in zip(out, self.gammas)]


class CrossScaleBlock(nn.Module):
    """A fixed random channel permutation per scale, then the parallel two-sided coupling."""

    def __init__(
        self,
        channels: Sequence[int],
        kernel_size: int,
        hidden: int,
        leaky_slope: float,
        clamp: float,
        generator: torch.Generator,
    ):
        super().__init__()
        self.permutations = nn.ModuleList(ChannelPermutation(c, generator) for c in channels)

        def subnet(c_in: list[int], c_out: list[int]) -> nn.Module:
            return CrossConvolutions(c_in, c_out, hidden, kernel_size, leaky_slope)

        self.coupling = ParallelAffineCoupling(channels, subnet, clamp)

    def forward(self, xs: list[Tensor], rev: bool = False) -> tuple[list[Tensor], Tensor]:
        if not rev:
            return self.coupling([perm(x) for perm, x in zip(self.permutations, xs)])
        xs, log_jac_det = self.coupling(xs, rev=True)
        return [perm(x, rev=True) for perm, x in zip(self.permutations, xs)], log_jac_det


@register_method("csflow")
class CSFlow(nn.Module):
    """Coupling blocks over all scales jointly (one per entry of kernel_sizes)."""

    config_class = CSFlowConfig

    def __init__(self, config: CSFlowConfig, feature_channels: Sequence[int]):
        super().__init__()
        if len(feature_channels) != config.n_scales:
            raise ConfigError(f"CS-Flow got {len(feature_channels)} feature scales but n_scales={config.n_scales}")
        if len(set(feature_channels)) != 1:
            # The image score identity in harness.scoring (latent_mean) needs equal channels.
            raise ConfigError(f"CS-Flow needs the same channels on every scale, got {list(feature_channels)}")
        self.config = config
        self.feature_channels = list(feature_channels)
        with seeded_construction(config.seed) as generator:
            self.blocks = nn.ModuleList(
                CrossScaleBlock(
                    feature_channels, k, config.hidden_channels, config.leaky_slope, config.clamp, generator
                )
                for k in config.kernel_sizes
            )

    def forward(self, features: list[Tensor]) -> FlowOutput:
        xs, log_jac_det = list(features), 0.0
        for block in self.blocks:
            xs, jac = block(xs)
            log_jac_det = log_jac_det + jac
        return FlowOutput(xs, log_jac_det)

    def inverse(self, latents: list[Tensor]) -> list[Tensor]:
        """Features from latents (used to check invertibility)."""
        xs = list(latents)
        for block in reversed(self.blocks):
            xs, _ = block(xs, rev=True)
        return xs

    def loss(self, out: FlowOutput) -> Tensor:
        """Batch mean of 0.5 * ||z||^2 - log|det J| over all scales, divided by the number of
        latent dimensions (304 * (24^2 + 12^2 + 6^2) = 229,824 at 768 px)."""
        z = torch.cat([latent.flatten(1) for latent in out.latents], dim=1)
        return torch.mean(0.5 * z.pow(2).sum(dim=1) - out.log_jac_det) / z.shape[1]

    def log_likelihood_maps(self, out: FlowOutput) -> list[Tensor]:
        """Per scale -0.5 * mean over channels of z^2: [B, h, w]. Minus the mean of all their
        entries is CS-Flow's image score (equal channels on every scale)."""
        return [-0.5 * z.pow(2).mean(dim=1) for z in out.latents]


__all__ = ["CSFlow", "CSFlowConfig", "CrossConvolutions", "MultiScaleEfficientNet", "stage_channels"]
