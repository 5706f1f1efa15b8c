"""U-Flow: a U-shaped normalizing flow for anomaly detection with unsupervised threshold.

M. Tailanian, Á. Pardo, P. Musé, J. Math. Imaging Vis. 2024 (arXiv 2211.12353).
Independent re-implementation from the specification in specs/baselines.md section 6.

Method. A frozen multi-scale vision transformer ("MS-CaiT") describes the image at two scales:
CaiT-M48 on the 448-pixel image (768 x 28 x 28) and CaiT-S24 on the image resized to 224 pixels
(384 x 14 x 14). The flow runs like the decoder of a U-Net: the coarsest scale is transformed
first by a stage of four affine coupling blocks; half of its output channels is emitted as that
scale's latent, the other half is moved to the next finer scale by an invertible depth-to-space
upsampling (4 channels -> 2x2 pixels) and concatenated after that scale's features, which then go
through their own stage of four blocks. Every latent is trained towards N(0, I) by maximum
likelihood. The anomaly map averages the per-scale likelihoods exp(-0.5 * mean_c z^2); the
segmentation is unsupervised: an a contrario test on the latents (harness.nfa) flags the regions
whose number of false alarms is below 1.

Deviations from the reference code, all documented at the setting that controls them:
- per-class learning rates, batches and epochs come from ``tuned_class``, which the shared loop
  sets to the class being trained;
- the loop evaluates every ``eval_every`` epochs on the last checkpoint (no early stopping on the
  test set); metrics are computed at ``metric_size`` (256, as the reference, which resizes maps
  and masks to 256) and the NFA at ``nfa_size`` (256);
- the image pipeline is the reference's: bilinear resize with antialias on the float image,
  masks resized bilinearly and thresholded at 0.5 (``image_resize``, ``mask_resize``);
- the NFA counts the lower tail of the chi-square bound, where it is not a valid bound, as the
  reference does (``official_lower_tail``; false in the unified protocol).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import FrEIA.modules as Fm
import numpy as np
import timm
from typing import ClassVar

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from harness import metrics as M
from harness.data import resize_masks
from harness.errors import ConfigError, HarnessError
from harness.features import FeatureExtractor, create_frozen_model
from harness.flows import FlowOutput, all_in_one_flow, alternating_conv_subnets, seeded_construction
from harness.nfa import nfa_log_maps
from harness.scoring import ScoringSpec
from methods.base import MethodConfig
from methods.registry import register_method

MCAIT = "mcait"
RESNETS = ("resnet18", "wide_resnet50_2")
# CNN backbones whose stage s has stride 2^(s+1), as a ResNet's: the ResNets and EfficientNet-Lite0.
CNN_BACKBONES = (*RESNETS, "tf_efficientnet_lite0")

# Learning rate, batch size and epochs selected by the authors per MVTec AD class
# (specs/baselines.md 6.3). Other classes and datasets use the default configuration.
TUNED_SETTINGS: dict[str, tuple[float, int, int]] = {
    "bottle": (1.129e-4, 23, 200),
    "cable": (1.616e-3, 14, 200),
    "capsule": (1.212e-3, 14, 200),
    "carpet": (3.163e-5, 13, 200),
    "grid": (3.622e-5, 12, 500),
    "hazelnut": (1.327e-3, 21, 500),
    "leather": (6.125e-4, 15, 500),
    "metal_nut": (8.149e-4, 11, 200),
    "pill": (1.076e-3, 11, 200),
    "screw": (4.156e-4, 11, 500),
    "tile": (6.046e-3, 30, 200),
    "toothbrush": (1.287e-4, 21, 200),
    "transistor": (1.121e-3, 20, 400),
    "wood": (2.467e-4, 22, 500),
    "zipper": (4.552e-5, 24, 200),
}
DEFAULT_LR, DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS = 1e-4, 8, 200
# Thresholds on -log10 NFA over which U-Flow's "oracle" mIoU is the best (the reference's range).
NFA_ORACLE_THRESHOLDS = np.arange(-400, 1001, dtype=np.float64)


@dataclass
class UFlowConfig(MethodConfig):
    """Every setting of U-Flow with the official default (specs/baselines.md section in brackets)."""

    label: ClassVar[str] = "U-Flow"

    # Features [6.1]: MS-CaiT. The backbone names carry timm weight tags; the block counts say how
    # many transformer blocks run before the final norm (41 of 48, 21 of 24).
    backbone: str = MCAIT  # or a CNN: "resnet18.a1_in1k", "wide_resnet50_2.racm_in1k", "tf_efficientnet_lite0"
    fine_backbone: str = "cait_m48_448.fb_dist_in1k"
    fine_blocks: int = 41
    coarse_backbone: str = "cait_s24_224.fb_dist_in1k"
    coarse_blocks: int = 21
    coarse_input_size: tuple[int, int] = (224, 224)  # the image is bicubic-resized to this for scale 2
    fine_weights_path: str | None = None  # local state dicts instead of the Hugging Face Hub
    coarse_weights_path: str | None = None
    resnet_stages: tuple[int, ...] = (1, 2, 3)  # ResNet alternative: stages, + trainable LayerNorm
    input_size: tuple[int, int] = (448, 448)  # (H, W): Resize + ImageNet normalisation, no augmentation
    # The reference's pipeline: torchvision Resize(448, antialias=True) on the float image, masks
    # resized bilinearly and thresholded at 0.5 (about 1 % of the defect pixels differ from NEAREST).
    image_resize: str = "bilinear_antialias"
    mask_resize: str = "bilinear"

    # U-shaped flow [6.2]
    blocks_per_stage: int = 4
    clamp: float = 2.0
    permute_soft: bool = False
    hidden_ratio: float = 1.0  # subnet conv-ReLU-conv, kernels 3 and 1 alternating

    # Optimisation [6.3]. The authors tuned lr, batch size and epochs per MVTec AD class; the
    # training loop sets tuned_class to the class being trained. Left at None, lr /
    # batch_size / epochs take that class's tuned values, or the default configuration's
    # (1e-4, 8, 200) for any other class or dataset; a value you set yourself wins.
    tuned_class: str = ""
    tuned_settings: dict[str, tuple[float, int, int]] = field(default_factory=lambda: dict(TUNED_SETTINGS))
    lr: float | None = None
    batch_size: int | None = None
    epochs: int | None = None
    weight_decay: float = 1e-5
    # LinearLR from 1.0 to 0.4 over 25000 "iterations", stepped once per EPOCH as in the reference
    # code: over 200-500 epochs the rate falls by less than 1.2 %, i.e. it is effectively constant.
    lr_end_factor: float = 0.4
    lr_total_iters: int = 25000
    grad_clip: float | None = None
    # The reference evaluates on the test set every epoch for early stopping; we evaluate every 10
    # epochs and report the last epoch (the best-on-test epoch is kept as a separate column).
    eval_every: int = 10
    seed: int = 0
    # Loss before 2024-01-22 (and anomalib): the z^2 term summed over the batch, the log-det averaged.
    loss_batch_sum_bug: bool = False

    # Scoring and a contrario segmentation [6.4]
    # Every metric is computed at 256x256 as in the reference: maps upsampled to it, masks resized
    # bilinearly and thresholded at 0.5 (None: the input size).
    metric_size: tuple[int, int] | None = (256, 256)
    # The NFA maps and their mIoU are computed at 256x256 as in the reference (None: the metric size).
    nfa_size: tuple[int, int] | None = (256, 256)
    # True: the reference's NFA, which also counts the invalid lower tail (flags under-dispersed
    # latents); false: log10 P = 0 where the Chernoff expression is not a bound (harness.nfa).
    official_lower_tail: bool = True

    def __post_init__(self) -> None:
        for name in ("coarse_input_size", "resnet_stages", "input_size"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("nfa_size", "metric_size"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))
        self.tuned_settings = {k: tuple(v) for k, v in self.tuned_settings.items()}
        self._apply_tuned_settings()
        architecture = self.backbone.partition(".")[0]
        self._check(self.backbone == MCAIT or architecture in CNN_BACKBONES, "backbone",
                    f"'{MCAIT}' or a timm {CNN_BACKBONES} name")
        self._check(len(self.input_size) == 2 and min(self.input_size) > 0, "input_size", "(height, width)")
        self._check(self.blocks_per_stage >= 1, "blocks_per_stage", "at least 1")
        self._check(self.clamp > 0, "clamp", "a positive number")
        self._check(self.hidden_ratio > 0, "hidden_ratio", "a positive number")
        self._check(self.lr > 0, "lr", "a positive number")
        self._check(self.batch_size >= 1, "batch_size", "at least 1")
        self._check(self.epochs >= 1, "epochs", "at least 1")
        self._check(self.eval_every >= 1, "eval_every", "at least 1")
        self._check(self.lr_total_iters >= 1, "lr_total_iters", "at least 1")
        self._check(self.nfa_size is None or len(self.nfa_size) == 2, "nfa_size", "(height, width) or null")
        self._check(self.metric_size is None or len(self.metric_size) == 2, "metric_size", "(height, width) or null")
        if self.backbone == MCAIT:
            self._check(self.fine_blocks >= 1, "fine_blocks", "at least 1")
            self._check(self.coarse_blocks >= 1, "coarse_blocks", "at least 1")
            fine_grid = [s // 16 for s in self.input_size]
            coarse_grid = [s // 16 for s in self.coarse_input_size]
            self._check(
                all(s % 16 == 0 for s in self.input_size + self.coarse_input_size)
                and fine_grid == [2 * g for g in coarse_grid],
                "coarse_input_size",
                f"half of input_size={self.input_size}, both multiples of 16 (CaiT patches), so that the "
                "coarse token grid is exactly half the fine one (e.g. 448 and 224)",
            )
        else:
            stages = list(self.resnet_stages)
            self._check(stages == list(range(stages[0], stages[0] + len(stages))) if stages else False,
                        "resnet_stages", "consecutive stages such as (1, 2, 3)")
            coarsest_stride = 2 ** (stages[-1] + 1)  # ResNet stage s has stride 2^(s+1)
            self._check(all(s % coarsest_stride == 0 for s in self.input_size), "input_size",
                        f"a multiple of {coarsest_stride} for ResNet stages {self.resnet_stages}")

    def _apply_tuned_settings(self) -> None:
        """Fill lr / batch_size / epochs left at None (when the config is created)."""
        tuned = self.tuned_settings.get(self.tuned_class, (DEFAULT_LR, DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS))
        for name, value, kind in zip(("lr", "batch_size", "epochs"), tuned, (float, int, int)):
            if getattr(self, name) is None:
                setattr(self, name, kind(value))

    def input_size_for(self, class_name: str) -> tuple[int, int]:
        return self.input_size

    def feature_sizes(self) -> list[tuple[int, int]]:
        """Spatial size of every feature scale, finest first."""
        if self.backbone == MCAIT:
            return [tuple(s // 16 for s in self.input_size), tuple(s // 16 for s in self.coarse_input_size)]
        return [tuple(s // 2 ** (stage + 1) for s in self.input_size) for stage in self.resnet_stages]

    def feature_extractor(self, pretrained: bool = True) -> nn.Module:
        if self.backbone == MCAIT:
            return MultiScaleCaiT(
                self.fine_backbone, self.fine_blocks, self.coarse_backbone, self.coarse_blocks,
                self.input_size, self.coarse_input_size, pretrained,
                self.fine_weights_path, self.coarse_weights_path,
            )
        # timm ResNet with its stock zero padding, stage maps unpooled.
        return FeatureExtractor(self.backbone, self.resnet_stages, pool="none", pretrained=pretrained,
                                padding_mode="zeros")

    def scoring(self) -> ScoringSpec:
        """map = 1 - mean over scales of exp(-0.5 mean_c z^2) upsampled (align_corners False);
        image score = max of the map [6.4]."""
        return ScoringSpec(
            image_aggregation="mean",
            pixel_aggregation="mean",
            pro_aggregation="mean",
            normalisation="image",
            image_reduction="max",
            align_corners=False,
        )

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam, default betas and eps, weight decay 1e-5."""
        return torch.optim.Adam([p for p in params if p.requires_grad], lr=self.lr, weight_decay=self.weight_decay)

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """LinearLR 1.0 -> lr_end_factor over lr_total_iters steps; the loop steps it once per epoch."""
        return torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1.0, end_factor=self.lr_end_factor, total_iters=self.lr_total_iters
        )

    def extra_metrics(
        self,
        log_likelihoods: Sequence[Tensor],
        channels: Sequence[int],
        masks: np.ndarray,
        image_size: tuple[int, int],
    ) -> dict[str, float]:
        """The unsupervised segmentation: pixels with log10 NFA < 0 [6.4], from float32 maps.

        miou_nfa_fair: U-Flow's published "fair" mIoU (all test images) at its automatic
        threshold log10 NFA = 0; miou_nfa_oracle: U-Flow's published "oracle", the best mIoU over
        the thresholds -log10 NFA = -400, -399, ..., 1000 (nfa_oracle_threshold). The
        likelihood-map mIoU of every method (miou_fair, miou_oracle) is computed by the loop.
        nfa_detected_fraction: share of test pixels detected; nfa_flagged_good_images: share of
        defect-free test images with any detection (the a contrario design expects few)."""
        size = tuple(self.nfa_size or image_size)
        log_nfa = nfa_log_maps(log_likelihoods, channels, size, self.official_lower_tail)
        masks_at = resize_masks(np.asarray(masks, dtype=bool), size)
        detected = log_nfa < 0
        good = ~masks_at.any(axis=(1, 2))
        flagged_good = detected[good].any(axis=(1, 2)).mean() if good.any() else float("nan")
        oracle, oracle_threshold = M.best_miou(masks_at, -log_nfa, NFA_ORACLE_THRESHOLDS)
        return {
            "miou_nfa_fair": M.miou(masks_at, -log_nfa, 0.0),
            "miou_nfa_oracle": oracle,
            "nfa_oracle_threshold": oracle_threshold,
            "nfa_detected_fraction": float(detected.mean()),
            "nfa_flagged_good_images": float(flagged_good),
        }


# --- MS-CaiT features [6.1] ------------------------------------------------------------------------


def create_cait(
    name: str, blocks: int, pretrained: bool, weights_path: str | Path | None = None
) -> nn.Module:
    """A frozen timm CaiT, with pretrained weights or random ones. Random weights are built with
    only the blocks that run (creation is faster); pretrained ones are loaded whole and cut by
    CaiTTrunk. Local weight files are given by fine_weights_path and coarse_weights_path."""
    architecture = name.partition(".")[0]
    if not timm.is_model(architecture) or not architecture.startswith("cait"):
        raise ConfigError(f"unknown CaiT backbone {name!r}; use a timm CaiT such as 'cait_m48_448.fb_dist_in1k'")
    try:
        return create_frozen_model(name, pretrained, weights_path, **({} if pretrained else {"depth": blocks}))
    except ConfigError:
        raise
    except HarnessError as error:  # weights that cannot be loaded: say which U-Flow settings name files
        raise HarnessError(f"{error} For U-Flow, local weight files are given by fine_weights_path and "
                           "coarse_weights_path.") from error


class CaiTTrunk(nn.Module):
    """Patch embedding + position embedding, the first ``blocks`` self-attention blocks and the
    final norm of a CaiT; returns the patch tokens as a map [B, C, H/16, W/16]. The class-attention
    blocks and the head are not used."""

    def __init__(self, cait: nn.Module, blocks: int, image_size: tuple[int, int]):
        super().__init__()
        if blocks > len(cait.blocks):
            raise ConfigError(f"the CaiT has {len(cait.blocks)} blocks; cannot run {blocks} of them")
        self.patch_embed = cait.patch_embed
        grid = [s // p for s, p in zip(image_size, self.patch_embed.patch_size)]
        pos_embed = cait.pos_embed.data
        if list(self.patch_embed.grid_size) != grid:  # another input size than the weights': resample
            pos_embed = resample_abs_pos_embed(pos_embed, new_size=grid, old_size=list(self.patch_embed.grid_size),
                                               num_prefix_tokens=0)
            self.patch_embed.set_input_size(img_size=tuple(image_size))
        self.pos_embed = nn.Parameter(pos_embed, requires_grad=False)
        self.blocks = nn.Sequential(*list(cait.blocks)[:blocks])
        self.norm = cait.norm
        self.channels: int = cait.embed_dim

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.patch_embed(images) + self.pos_embed
        tokens = self.norm(self.blocks(tokens))
        h, w = (s // p for s, p in zip(images.shape[-2:], self.patch_embed.patch_size))
        return tokens.transpose(1, 2).reshape(tokens.shape[0], self.channels, h, w)


class MultiScaleCaiT(nn.Module):
    """MS-CaiT: a CaiT on the input image (fine scale) and another on the image bicubic-resized to
    ``coarse_input_size`` (coarse scale). Frozen, eval mode. forward -> [fine, coarse]."""

    def __init__(
        self,
        fine_backbone: str = "cait_m48_448.fb_dist_in1k",
        fine_blocks: int = 41,
        coarse_backbone: str = "cait_s24_224.fb_dist_in1k",
        coarse_blocks: int = 21,
        input_size: tuple[int, int] = (448, 448),
        coarse_input_size: tuple[int, int] = (224, 224),
        pretrained: bool = True,
        fine_weights_path: str | Path | None = None,
        coarse_weights_path: str | Path | None = None,
    ):
        super().__init__()
        self.names = (fine_backbone, coarse_backbone)
        self.block_counts = (fine_blocks, coarse_blocks)
        self.sizes = (tuple(input_size), tuple(coarse_input_size))
        self.pretrained = pretrained
        self.weights_paths = (fine_weights_path, coarse_weights_path)
        self.fine = CaiTTrunk(create_cait(fine_backbone, fine_blocks, pretrained, fine_weights_path),
                              fine_blocks, input_size)
        self.coarse = CaiTTrunk(create_cait(coarse_backbone, coarse_blocks, pretrained, coarse_weights_path),
                                coarse_blocks, coarse_input_size)
        self.channels: list[int] = [self.fine.channels, self.coarse.channels]
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> MultiScaleCaiT:
        return super().train(False)  # frozen: dropout and drop-path stay off

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        small = F.interpolate(images, size=self.sizes[1], mode="bicubic", align_corners=True)
        return [self.fine(images), self.coarse(small)]

    def cache_key(self) -> str:
        """Everything the features depend on, apart from the image."""
        if not self.pretrained:
            weights = "random"
        else:
            weights = ",".join(f"file:{Path(p).name}" if p else "pretrained" for p in self.weights_paths)
        scales = "|".join(
            f"{name}:blocks={n}@{size[0]}x{size[1]}" for name, n, size in zip(self.names, self.block_counts, self.sizes)
        )
        return f"mcait|{scales}|weights={weights}"


# --- the U-shaped flow [6.2] -----------------------------------------------------------------------


def flow_stage(channels: int, config: UFlowConfig, generator: torch.Generator):
    """Four AllInOneBlocks: clamp 2, SOFTPLUS global affine, hard permutations, conv-ReLU-conv
    subnets (hidden = input channels) with 3x3 kernels on even blocks and 1x1 on odd ones."""
    return all_in_one_flow(
        (channels, 1, 1),  # 1x1 declared: the blocks are fully convolutional
        config.blocks_per_stage,
        alternating_conv_subnets(config.blocks_per_stage, config.hidden_ratio, norm="none"),
        generator,
        clamp=config.clamp,
        global_affine_type="SOFTPLUS",
        permute_soft=config.permute_soft,
    )


def split_channels(x: Tensor, first: int) -> tuple[Tensor, Tensor]:
    """The first ``first`` channels and the rest."""
    return torch.split(x, [first, x.shape[1] - first], dim=1)


@register_method("uflow")
class UFlow(nn.Module):
    """Stages from the coarsest scale to the finest; between stages half of the channels leave as a
    latent and half are upsampled (depth-to-space) and appended to the next scale's features."""

    config_class = UFlowConfig

    def __init__(self, config: UFlowConfig, feature_channels: Sequence[int]):
        super().__init__()
        self.config = config
        self.feature_channels = list(feature_channels)
        n = len(self.feature_channels)
        # Channels entering each stage (index 0 = finest), and how many each stage sends upwards.
        self.stage_channels = [0] * n
        self.upsampled_channels = [0] * n
        carried = 0
        for s in reversed(range(n)):
            self.stage_channels[s] = self.feature_channels[s] + carried
            if s > 0:
                moving = self.stage_channels[s] // 2
                if moving % 4 != 0:
                    raise ConfigError(
                        f"U-Flow moves half of the {self.stage_channels[s]} channels of scale {s} to the next scale "
                        "through a 2x2 depth-to-space upsampling, which needs a multiple of 4 channels; "
                        "choose another backbone"
                    )
                self.upsampled_channels[s] = moving
                carried = moving // 4
        with seeded_construction(config.seed) as generator:
            self.stages = nn.ModuleList(flow_stage(c, config, generator) for c in self.stage_channels)
        # FrEIA's i-RevNet upsampling (no parameters, log-det 0); declared 1x1, it works at any size.
        self.upsamplers = nn.ModuleList(
            Fm.IRevNetUpsampling([(c, 1, 1)]) if c else nn.Identity() for c in self.upsampled_channels
        )
        self.feature_norms = None
        # ResNet alternative: a trainable LayerNorm over [C, H, W] per scale, as FastFlow. It normalises
        # the features before the flow and is not part of the log-determinant.
        if config.backbone != MCAIT:
            self.feature_norms = nn.ModuleList(
                nn.LayerNorm([c, *hw], elementwise_affine=True)
                for c, hw in zip(self.feature_channels, config.feature_sizes())
            )

    def forward(self, features: list[Tensor]) -> FlowOutput:
        if self.feature_norms is not None:
            features = [norm(x) for norm, x in zip(self.feature_norms, features)]
        latents: list[Tensor] = [None] * len(features)  # type: ignore[list-item]
        log_jac_det, carried = 0.0, None
        for s in reversed(range(len(features))):
            x = features[s] if carried is None else torch.cat([features[s], carried], dim=1)
            y, jac = self.stages[s](x)
            log_jac_det = log_jac_det + jac
            if s == 0:
                latents[s] = y
            else:
                moving, latents[s] = split_channels(y, self.upsampled_channels[s])
                (carried,), _ = self.upsamplers[s]([moving])
        return FlowOutput(latents, log_jac_det)

    def inverse(self, latents: list[Tensor]) -> list[Tensor]:
        """Features from latents (checks invertibility). With the ResNet LayerNorms, the features
        after normalisation."""
        n = len(latents)
        features: list[Tensor] = [None] * n  # type: ignore[list-item]
        y = latents[0]
        for s in range(n):  # finest to coarsest
            x, _ = self.stages[s](y, rev=True)
            if s == n - 1:
                features[s] = x
                break
            features[s], carried = split_channels(x, self.feature_channels[s])
            (moving,), _ = self.upsamplers[s + 1]([carried], rev=True)
            y = torch.cat([moving, latents[s + 1]], dim=1)
        return features

    def loss(self, out: FlowOutput) -> Tensor:
        """Mean over the batch of (sum over scales of 0.5 ||z_s||^2 - log-det) [6.3]; with
        loss_batch_sum_bug the z^2 term is summed over the batch too (reference before 2024-01)."""
        half_squared_norm = sum(0.5 * z.pow(2).sum(dim=(1, 2, 3)) for z in out.latents)
        if self.config.loss_batch_sum_bug:
            return half_squared_norm.sum() - out.log_jac_det.mean()
        return torch.mean(half_squared_norm - out.log_jac_det)

    def log_likelihood_maps(self, out: FlowOutput) -> list[Tensor]:
        """Per scale -0.5 * mean over channels of z^2 (the mean, not the sum: every scale weighs
        the same in the map) [6.4]."""
        return [-0.5 * z.pow(2).mean(dim=1) for z in out.latents]
