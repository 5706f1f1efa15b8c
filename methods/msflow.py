"""MSFlow: Multi-Scale Flow-based Framework for Unsupervised Anomaly Detection.

Y. Zhou, X. Xu, J. Song, F. Shen, H. T. Shen, IEEE TNNLS 2024 (arXiv 2308.15300).
Independent re-implementation from the specification in specs/msflow.md.

Method. A frozen ImageNet backbone gives feature maps at several stages; each map is
average-pooled (k3, s2, p1). Every scale is transformed by its own flow of conditional affine
coupling blocks (the "parallel flows"), with more blocks for deeper scales (2, 5, 8: the
asymmetric design) and a 64-channel sinusoidal position code as condition. A single "fusion
flow" then couples all scales jointly: after a fixed random channel permutation per scale, one
two-sided affine coupling whose subnet pools every scale to the coarsest size, mixes them with
convolutions, and brings the result back to every scale. Training minimises the negative
log-likelihood of the fused latents under a standard normal; test-time, per-scale log-likelihood
maps are combined multiplicatively for the image score and additively for the pixel map.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.errors import ConfigError
from harness.features import FeatureExtractor
from harness.scoring import AGGREGATIONS, ScoringSpec
from harness.flows import (
    SUBNET_NORMS,
    ChannelLayerNorm,
    ChannelPermutation,
    ParallelAffineCoupling,
    FlowOutput,
    all_in_one_flow,
    conv_subnet,
    positional_encoding_2d,
    seeded_construction,
)
from methods.base import MethodConfig, MetaEpochs
from methods.registry import register_method

POOLS = ("avg", "max", "none")


@dataclass
class MSFlowConfig(MethodConfig, MetaEpochs):
    """Every setting of MSFlow with the official default (specs/msflow.md section in brackets).
    Every ablation of the paper is one of these fields."""

    label: ClassVar[str] = "MSFlow"

    # Features [1]. Ablations: backbone "resnet18.tv_in1k"; stages (2, 3) or (1, 2, 3, 4);
    # pool "max" / "none"; pool_kernel.
    backbone: str = "wide_resnet50_2.tv_in1k"  # torchvision V1 weights, as the official code
    stages: tuple[int, ...] = (1, 2, 3)
    padding_mode: str = "reflect"  # the official backbone pads 3x3 and 7x7 convs by reflection
    pool: str = "avg"
    pool_kernel: int = 3
    input_size: tuple[int, int] = (512, 512)  # (H, W)
    input_size_overrides: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {"transistor": (256, 256)}  # MVTec AD, as in the paper and its log
    )

    # Parallel flows [2]. Ablations: parallel_blocks (e.g. (8, 8, 8)), subnet_norm "none" / "bn".
    parallel_blocks: tuple[int, ...] = (2, 5, 8)
    subnet_norm: str = "ln"
    clamp: float = 1.9
    cond_channels: int = 64

    # Fusion flow [3]. Ablation: off.
    fusion: bool = True

    # Optimisation [4]
    lr: float = 1e-4
    batch_size: int = 8  # the code's CLI default; default.py and the paper say 16
    meta_epochs: int = 25  # evaluation after every meta-epoch
    sub_epochs: int = 4  # training epochs per meta-epoch: 25 x 4 = 100 epochs
    warmup_from: float = 0.1  # linear warm-up from 0.1*lr to lr ...
    warmup_meta_epochs: int = 3  # ... over 3 meta-epochs = 12 training epochs
    lr_milestones: tuple[int, ...] = (70, 90)  # in training epochs
    lr_gamma: float = 0.33
    grad_clip: float = 2.0  # max gradient norm, every step
    seed: int = 9826

    # Scoring [5]. Ablations: aggregation of per-scale likelihoods, top-K fraction.
    top_k: float = 0.03  # image score = mean of the top 3% of the anomaly map
    image_aggregation: str = "mul"
    pixel_aggregation: str = "add"

    def __post_init__(self) -> None:
        # YAML and the command line give lists; keep tuples so configs compare and print alike.
        for name in ("stages", "input_size", "parallel_blocks", "lr_milestones"):
            setattr(self, name, tuple(getattr(self, name)))
        self.input_size_overrides = {k: tuple(v) for k, v in self.input_size_overrides.items()}
        self._check(self.pool in POOLS, "pool", f"one of {POOLS}")
        self._check(self.subnet_norm in SUBNET_NORMS, "subnet_norm", f"one of {SUBNET_NORMS}")
        self._check(self.image_aggregation in AGGREGATIONS, "image_aggregation", f"one of {AGGREGATIONS}")
        self._check(self.pixel_aggregation in AGGREGATIONS, "pixel_aggregation", f"one of {AGGREGATIONS}")
        self._check(
            len(self.parallel_blocks) == len(self.stages),
            "parallel_blocks",
            f"one block count per stage ({len(self.stages)} for stages {self.stages})",
        )
        self._check(all(n >= 1 for n in self.parallel_blocks), "parallel_blocks", "counts >= 1")
        self._check(self.pool_kernel >= 1 and self.pool_kernel % 2 == 1, "pool_kernel", "an odd kernel size")
        self._check(0.0 < self.top_k <= 1.0, "top_k", "a fraction in (0, 1]")
        self._check(self.cond_channels > 0 and self.cond_channels % 4 == 0, "cond_channels", "a multiple of 4")
        self._check(len(self.input_size) == 2, "input_size", "(height, width)")

    def scoring(self) -> ScoringSpec:
        """Image score and PRO on the multiplicative map, pixel AUROC on the additive one [5, 6]."""
        return ScoringSpec(
            image_aggregation=self.image_aggregation,
            pixel_aggregation=self.pixel_aggregation,
            pro_aggregation=self.image_aggregation,
            normalisation="image",
            image_reduction="topk",
            top_k=self.top_k,
            align_corners=True,
        )

    def input_size_for(self, class_name: str) -> tuple[int, int]:
        return self.input_size_overrides.get(class_name, self.input_size)

    def feature_extractor_kwargs(self) -> dict:
        """Arguments for harness.features.FeatureExtractor."""
        return dict(
            backbone=self.backbone,
            stages=self.stages,
            pool=self.pool,
            pool_kernel=self.pool_kernel,
            padding_mode=self.padding_mode,
        )

    def feature_extractor(self, pretrained: bool = True) -> FeatureExtractor:
        return FeatureExtractor(**self.feature_extractor_kwargs(), pretrained=pretrained)

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return make_optimizer(self, params)

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return make_scheduler(self, optimizer)


def make_optimizer(config: MSFlowConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam over the trainable flow parameters, default betas and eps, no weight decay."""
    return torch.optim.Adam([p for p in params if p.requires_grad], lr=config.lr)


def make_scheduler(config: MSFlowConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up from warmup_from*lr to lr over warmup_meta_epochs*sub_epochs epochs, times a
    step decay by lr_gamma at each milestone. Call .step() once per training epoch.
    With the defaults: 1e-5, 1.75e-5, ..., 1e-4 at epoch 12, 3.3e-5 from 70, 1.089e-5 from 90."""
    schedules: list[torch.optim.lr_scheduler.LRScheduler] = []
    warmup_epochs = config.warmup_meta_epochs * config.sub_epochs
    if warmup_epochs > 0:
        schedules.append(
            torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=config.warmup_from, end_factor=1.0, total_iters=warmup_epochs
            )
        )
    schedules.append(
        torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma)
    )
    return torch.optim.lr_scheduler.ChainedScheduler(schedules)


# --- fusion flow [3] ----------------------------------------------------------------------------


class CrossScaleMixer(nn.Module):
    """Shrink every scale to the coarsest size, concatenate, fuse by conv-LN-ReLU-conv-ReLU,
    split, bring each part back to its scale's size and add it to that scale's input."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        self.channels = list(channels)
        total = sum(channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(total, total // 4, 3, padding=1),
            ChannelLayerNorm(total // 4, eps=1e-5),
            nn.ReLU(),
            nn.Conv2d(total // 4, total, 3, padding=1),
            nn.ReLU(),
        )

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        smallest = min((x.shape[-2:] for x in xs), key=lambda hw: hw[0] * hw[1])
        pooled = [F.adaptive_avg_pool2d(x, smallest) for x in xs]
        mixed = torch.split(self.fuse(torch.cat(pooled, dim=1)), self.channels, dim=1)
        return [
            x + F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=True)
            for x, m in zip(xs, mixed)
        ]


class FusionSubnet(nn.Module):
    """Per-scale [log-scale s | shift t] for one half of the fusion coupling, from all scales:
    the cross-scale mixer, then two separate conv3x3 per scale (one for s, one for t)."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int]):
        super().__init__()
        half = [o // 2 for o in out_channels]  # out_channels counts s and t together
        self.mixer = CrossScaleMixer(in_channels)
        self.scale_convs = nn.ModuleList(nn.Conv2d(c, o, 3, padding=1) for c, o in zip(in_channels, half))
        self.shift_convs = nn.ModuleList(nn.Conv2d(c, o, 3, padding=1) for c, o in zip(in_channels, half))

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        mixed = self.mixer(xs)
        return [
            torch.cat([scale(x), shift(x)], dim=1)
            for scale, shift, x in zip(self.scale_convs, self.shift_convs, mixed)
        ]


class FusionFlow(nn.Module):
    """A fixed random channel permutation per scale, then one fusion coupling."""

    def __init__(self, channels: Sequence[int], clamp: float, generator: torch.Generator):
        super().__init__()
        self.permutations = nn.ModuleList(ChannelPermutation(c, generator) for c in channels)
        # One two-sided affine coupling over all scales jointly (CS-Flow style), unconditioned,
        # with the atan soft clamp; no 0.1 scaling of the subnet output here.
        self.coupling = ParallelAffineCoupling(channels, FusionSubnet, clamp)

    def forward(self, xs: list[Tensor], rev: bool = False) -> tuple[list[Tensor], Tensor]:
        if not rev:
            xs = [perm(x) for perm, x in zip(self.permutations, xs)]
            return self.coupling(xs)
        xs, log_jac_det = self.coupling(xs, rev=True)
        return [perm(x, rev=True) for perm, x in zip(self.permutations, xs)], log_jac_det


# --- the model -----------------------------------------------------------------------------------


@register_method("msflow")
class MSFlow(nn.Module):
    """Parallel flows (one per scale) followed by the fusion flow."""

    config_class = MSFlowConfig

    def __init__(self, config: MSFlowConfig, feature_channels: Sequence[int]):
        super().__init__()
        if len(feature_channels) != len(config.parallel_blocks):
            raise ConfigError(
                f"MSFlow got {len(feature_channels)} feature scales but parallel_blocks="
                f"{config.parallel_blocks}; give one block count per backbone stage"
            )
        self.config = config
        self.feature_channels = list(feature_channels)
        with seeded_construction(config.seed) as generator:
            self.parallel_flows = nn.ModuleList(
                all_in_one_flow(
                    (channels, 1, 1),  # 1x1 declared: the blocks are fully convolutional
                    n_blocks,
                    conv_subnet(config.subnet_norm, kernel_size=3),
                    generator,
                    clamp=config.clamp,
                    cond_channels=config.cond_channels,
                    global_affine_type="SOFTPLUS",
                )
                for channels, n_blocks in zip(feature_channels, config.parallel_blocks)
            )
            self.fusion_flow = FusionFlow(feature_channels, config.clamp, generator) if config.fusion else None
        self._position_codes: dict[tuple, Tensor] = {}  # fixed, so computed once per size and device

    def _position_code(self, x: Tensor) -> Tensor:
        key = (*x.shape[-2:], x.device, x.dtype)
        if key not in self._position_codes:
            self._position_codes[key] = positional_encoding_2d(
                self.config.cond_channels, *x.shape[-2:], device=x.device, dtype=x.dtype
            )
        return self._position_codes[key].unsqueeze(0).expand(x.shape[0], -1, -1, -1)

    def forward(self, features: list[Tensor]) -> FlowOutput:
        latents, log_jac_det = [], 0.0
        for flow, x in zip(self.parallel_flows, features):
            z, jac = flow(x, c=[self._position_code(x)])
            latents.append(z)
            log_jac_det = log_jac_det + jac
        if self.fusion_flow is not None:
            latents, jac = self.fusion_flow(latents)
            log_jac_det = log_jac_det + jac
        return FlowOutput(latents, log_jac_det)

    def inverse(self, latents: list[Tensor]) -> list[Tensor]:
        """Features from latents (used to check invertibility)."""
        if self.fusion_flow is not None:
            latents, _ = self.fusion_flow(latents, rev=True)
        return [flow(z, c=[self._position_code(z)], rev=True)[0] for flow, z in zip(self.parallel_flows, latents)]

    def loss(self, out: FlowOutput) -> Tensor:
        """Negative log-likelihood under N(0, I) without the constant, summed over all latent
        dimensions of all scales (not divided by their number), averaged over the batch."""
        half_squared_norm = sum(0.5 * z.pow(2).sum(dim=(1, 2, 3)) for z in out.latents)
        return torch.mean(half_squared_norm - out.log_jac_det)

    def log_likelihood_maps(self, out: FlowOutput) -> list[Tensor]:
        """Per scale -0.5 * mean over channels of z^2: [B, h, w], Jacobian not included."""
        return [-0.5 * z.pow(2).mean(dim=1) for z in out.latents]
