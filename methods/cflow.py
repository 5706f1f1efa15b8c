"""CFlow-AD: Real-Time Unsupervised Anomaly Detection via Conditional Normalizing Flows.

D. Gudovskiy, S. Ishizaka, K. Kozuka, WACV 2022 (arXiv 2107.12571).
Independent re-implementation from the specification in specs/baselines.md, section 3.

Method. A frozen ImageNet encoder (Wide-ResNet-50-2 with torchvision V1 weights and reflection
padding) gives the feature maps of layer2, layer3 and layer4, unpooled and unnormalised. Each
layer has its own "decoder": a conditional normalizing flow of 8 affine coupling blocks that acts
on single feature vectors ("fibers", one per pixel of the map), conditioned on a 128-channel 2-D
sinusoidal code of the fiber's position. Training takes, for every image batch and every layer,
all B*H*W fibers in a random order, cut into batches of N = 256, one optimiser step per fiber
batch; the loss is -log(sigmoid(log p / C)) with log p the fiber's log-likelihood in C dimensions.
At test time, each layer's per-dimension log-likelihood map is turned into a probability map by
subtracting its maximum over the whole test set and exponentiating; the maps are upsampled, summed,
and subtracted from the set-wide maximum of the sum. The image score is the maximum of that map.

Settings that the official code leaves to chance or to its command line, and how they are fixed here:
- seed: the official code seeds from the clock; here ``seed`` (default 0) fixes the decoders'
  initialisation and rotations, and the training loop's seed fixes fiber order and augmentation.
- zero_grad: the official code ran on torch 1.8, whose ``zero_grad()`` kept zero-filled
  gradients, so Adam kept moving the decoders not being trained; ``torch18_zero_grad`` (on by
  default) reproduces it, off gives torch 2's behaviour.
- learning-rate warm-up: the official code ramps the rate after every image batch during the
  first 2 meta-epochs; here it ramps once per training epoch (the loop steps schedulers per epoch),
  and the value at the start of every epoch is the official one. The cosine part is per
  meta-epoch, as in the official code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from harness import metrics as M
from harness.data import IMAGENET_MEAN, IMAGENET_STD
from harness.errors import ConfigError
from harness.features import FeatureExtractor
from harness.flows import FlowOutput, all_in_one_flow, fc_subnet, positional_encoding_2d, seeded_construction
from harness.scoring import NORMALISATIONS, ScoringSpec, score
from methods.base import MethodConfig, MetaEpochs
from methods.registry import register_method

GLOBAL_AFFINE_TYPES = ("SOFTPLUS", "SIGMOID", "EXP")
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
# Fibers per decoder call when a whole image batch is transformed at once (evaluation): bounds the
# memory of the subnets' hidden activations without changing any result.
FORWARD_CHUNK = 1 << 16

# Input size per MVTec AD class in the reference table (README commands and parse_results.py);
# every other class, and every other dataset, uses input_size (the official command-line default).
MVTEC_INPUT_SIZES: dict[str, tuple[int, int]] = {
    **{name: (512, 512) for name in (
        "bottle", "carpet", "grid", "leather", "screw", "tile", "toothbrush", "wood", "zipper")},
    **{name: (256, 256) for name in ("cable", "capsule", "hazelnut", "metal_nut", "pill")},
    "transistor": (128, 128),
}


@dataclass
class CFlowConfig(MethodConfig, MetaEpochs):
    """Every setting of CFlow-AD with the official default (specs/baselines.md, section 3.x)."""

    label: ClassVar[str] = "CFlow"

    # Encoder [3.1]: layer2-4 of WRN-50 (torchvision V1 weights, reflection padding), no pooling,
    # no normalisation of the features.
    backbone: str = "wide_resnet50_2.tv_in1k"
    stages: tuple[int, ...] = (2, 3, 4)
    padding_mode: str = "reflect"
    input_size: tuple[int, int] = (256, 256)  # (H, W)
    input_size_overrides: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(MVTEC_INPUT_SIZES))

    # Decoders [3.2]: per layer a flow of AllInOneBlocks on feature vectors.
    coupling_blocks: int = 8
    clamp: float = 1.9
    global_affine_type: str = "SOFTPLUS"
    permute_soft: bool = True  # a random rotation from SO(C) after every block (slow to build for C>512)
    cond_channels: int = 128  # positional code, concatenated to the subnet input inside every block
    subnet_hidden_ratio: float = 2.0  # Linear(d_in -> 2 d_in), ReLU, Linear(2 d_in -> d_out)

    # Training [3.3]
    fiber_batch_size: int = 256  # N; the remainder of each layer's B*H*W fibers is dropped
    lr: float = 2e-4
    batch_size: int = 32
    drop_last: bool = True  # a partial last image batch gives no training step (the loop; official loader)
    meta_epochs: int = 25  # evaluation after every meta-epoch
    sub_epochs: int = 8  # training epochs per meta-epoch: 25 x 8 = 200
    warmup_meta_epochs: int = 2  # linear warm-up from warmup_from * lr to the cosine value at its end
    warmup_from: float = 0.1
    eta_min_factor: float = 1e-3  # cosine floor = lr * 0.1^3
    grad_clip: float | None = None
    rotation_degrees: float = 5.0  # RandomRotation(5) on training images; 0 = no augmentation
    seed: int = 0
    # The reference ran on torch 1.8, whose zero_grad() left zero-filled gradients: from the first
    # time a decoder is trained on, Adam moves it at every fiber step of the other two decoders as
    # well (by its running moments). True reproduces that; False = torch 2's zero_grad, which
    # drops the gradients so that Adam leaves idle decoders alone (the unified protocol).
    torch18_zero_grad: bool = True

    # Scoring [3.4]: "set" = per-layer and final maxima over the whole test set (official);
    # "image" = per image (the unified protocol).
    normalisation: str = "set"

    def __post_init__(self) -> None:
        # YAML and the command line give lists; keep tuples so configs compare and print alike.
        for name in ("stages", "input_size"):
            setattr(self, name, tuple(getattr(self, name)))
        self.input_size_overrides = {k: tuple(v) for k, v in self.input_size_overrides.items()}
        self._check(len(self.stages) >= 1, "stages", "at least one backbone stage")
        self._check(len(self.input_size) == 2, "input_size", "(height, width)")
        self._check(self.coupling_blocks >= 1, "coupling_blocks", "at least 1")
        self._check(self.clamp > 0, "clamp", "a positive number")
        self._check(
            self.global_affine_type in GLOBAL_AFFINE_TYPES, "global_affine_type", f"one of {GLOBAL_AFFINE_TYPES}"
        )
        self._check(self.cond_channels > 0 and self.cond_channels % 4 == 0, "cond_channels", "a multiple of 4")
        self._check(self.subnet_hidden_ratio > 0, "subnet_hidden_ratio", "a positive number")
        self._check(self.fiber_batch_size >= 1, "fiber_batch_size", "at least 1")
        self._check(self.batch_size >= 1, "batch_size", "at least 1")
        self._check(self.meta_epochs >= 1, "meta_epochs", "at least 1")
        self._check(self.sub_epochs >= 1, "sub_epochs", "at least 1")
        self._check(
            0 <= self.warmup_meta_epochs <= self.meta_epochs, "warmup_meta_epochs", "between 0 and meta_epochs"
        )
        self._check(0.0 < self.warmup_from <= 1.0, "warmup_from", "a fraction in (0, 1]")
        self._check(0.0 <= self.eta_min_factor <= 1.0, "eta_min_factor", "a fraction in [0, 1]")
        self._check(self.rotation_degrees >= 0, "rotation_degrees", "0 (off) or a positive angle")
        self._check(self.normalisation in NORMALISATIONS, "normalisation", f"one of {NORMALISATIONS}")

    @property
    def augment(self) -> bool:
        """Rotation augmentation: the loop runs the encoder on every augmented batch (no feature cache)."""
        return self.rotation_degrees > 0

    def augment_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Rotate every image by its own angle, uniform in [-rotation_degrees, rotation_degrees].
        generator=None draws from torch's default generator, which the training loop seeds and
        checkpoints."""
        return random_rotation_augment(images, self.rotation_degrees, generator, self.mean, self.std)

    def input_size_for(self, class_name: str) -> tuple[int, int]:
        return self.input_size_overrides.get(class_name, self.input_size)

    def feature_extractor_kwargs(self) -> dict:
        """Arguments for harness.features.FeatureExtractor: the stage maps as they are."""
        return dict(backbone=self.backbone, stages=self.stages, pool="none", padding_mode=self.padding_mode)

    def feature_extractor(self, pretrained: bool = True) -> FeatureExtractor:
        return FeatureExtractor(**self.feature_extractor_kwargs(), pretrained=pretrained)

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """One Adam over all decoders, default betas and eps, no weight decay; with torch18_zero_grad,
        gradients are zero-filled between steps instead of dropped."""
        adam = ZeroFilledGradAdam if self.torch18_zero_grad else torch.optim.Adam
        return adam([p for p in params if p.requires_grad], lr=self.lr)

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return make_scheduler(self, optimizer)

    def extra_metrics(self, log_likelihoods: Sequence[Tensor], channels: Sequence[int], masks: np.ndarray,
                      image_size: tuple[int, int]) -> dict[str, float]:
        """AU-PRO as CFlow-AD's own code computes it (the convention of its published PRO; see
        harness.metrics, "cflow"), on the final model's PRO map."""
        if not np.asarray(masks).any():
            return {}
        pro_map = score(log_likelihoods, image_size, self.scoring()).pro_map.numpy()
        return {"aupro_cflow": M.aupro(masks, pro_map, convention="cflow", n_thresholds=1000)}

    def scoring(self) -> ScoringSpec:
        """One additive map for every metric, image score = its maximum [3.4]."""
        return ScoringSpec(
            image_aggregation="add",
            pixel_aggregation="add",
            pro_aggregation="add",
            normalisation=self.normalisation,
            image_reduction="max",
            align_corners=True,
        )


class ZeroFilledGradAdam(torch.optim.Adam):
    """Adam whose zero_grad() fills gradients with zeros instead of dropping them, whatever the
    caller asks (torch 1.8's behaviour). A parameter that has had a gradient once then takes a
    step at every optimiser step, driven by its running moments, even when the loss does not
    depend on it: CFlow's decoders keep moving while another layer's fibers are trained."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=False)


# --- learning rate [3.3] -------------------------------------------------------------------------


def cosine_learning_rate(config: CFlowConfig, meta_epoch: int) -> float:
    """Cosine from lr (meta-epoch 0) towards lr * eta_min_factor (meta-epoch meta_epochs)."""
    eta_min = config.lr * config.eta_min_factor
    return eta_min + (config.lr - eta_min) * (1.0 + math.cos(math.pi * meta_epoch / config.meta_epochs)) / 2.0


def learning_rate(config: CFlowConfig, epoch: int) -> float:
    """The learning rate during training epoch ``epoch`` (0-based).

    Warm-up: linear in the epoch over the first warmup_meta_epochs meta-epochs, from warmup_from * lr
    to the cosine value at the end of the warm-up (so the two parts join). After it: the cosine of
    the current meta-epoch, constant within a meta-epoch.
    With the defaults: 2e-5 at epoch 0, 2e-5 + k/16 * (1.9686e-4 - 2e-5) at epoch k < 16,
    1.9686e-4 for epochs 16-23, ..., 9.88e-7 for epochs 192-199."""
    meta_epoch = epoch // config.sub_epochs
    if meta_epoch < config.warmup_meta_epochs:
        start = config.warmup_from * config.lr
        end = cosine_learning_rate(config, config.warmup_meta_epochs)
        progress = epoch / (config.warmup_meta_epochs * config.sub_epochs)
        return start + progress * (end - start)
    return cosine_learning_rate(config, meta_epoch)


def make_scheduler(config: CFlowConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """learning_rate() as a scheduler; call .step() once per training epoch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: learning_rate(config, epoch) / config.lr)


# --- augmentation [3.3] ----------------------------------------------------------------------------


def random_rotation_augment(images: Tensor, degrees: float, generator: torch.Generator | None = None,
                            mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """torchvision RandomRotation(degrees) applied image by image to normalised images [B, 3, H, W].

    Same as the reference: nearest-neighbour interpolation (RandomRotation's default), no expansion,
    rotation about the centre, and corners filled with black. The images here are already
    normalised with ``mean`` and ``std``, so "black" is the normalised value of 0 in every channel."""
    if degrees <= 0:
        return images
    angles = (torch.rand(images.shape[0], generator=generator, dtype=torch.float64) * 2.0 - 1.0) * degrees
    black = [-m / s for m, s in zip(mean, std)]
    fill = black if images.shape[1] == len(black) else 0.0
    rotated = [
        TF.rotate(image, float(angle), interpolation=InterpolationMode.NEAREST, fill=fill)
        for image, angle in zip(images, angles)
    ]
    return torch.stack(rotated)


# --- fibers ---------------------------------------------------------------------------------------


def to_fibers(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B*H*W, C], ordered image by image, row by row."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def from_fibers(fibers: Tensor, batch: int, height: int, width: int) -> Tensor:
    """[B*H*W, C] -> [B, C, H, W] (the inverse of to_fibers)."""
    return fibers.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


def fiber_batches(n_fibers: int, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """Random order of the n fibers cut into floor(n / N) batches of N: [n // N, N] indices.
    The last n mod N fibers of the order are dropped, as in the reference."""
    order = torch.randperm(n_fibers, generator=generator)
    n_batches = n_fibers // batch_size
    return order[: n_batches * batch_size].reshape(n_batches, batch_size)


def log_likelihood_per_dim(z: Tensor, log_jac_det: Tensor) -> Tensor:
    """log p(x) / C for fibers: z [n, C], log_jac_det [n] -> [n].

    log p = C * (-0.5 ln 2 pi) - 0.5 ||z||^2 + log|det J|, divided by the dimension C once."""
    channels = z.shape[1]
    log_p = -channels * HALF_LOG_2PI - 0.5 * z.float().pow(2).sum(dim=1) + log_jac_det.float()
    return log_p / channels


def fiber_loss(log_p_per_dim: Tensor) -> Tensor:
    """Mean over fibers of -log(sigmoid(log p / C)) = softplus(-log p / C)."""
    return -F.logsigmoid(log_p_per_dim).mean()


# --- the model -----------------------------------------------------------------------------------


@dataclass
class CFlowOutput(FlowOutput):
    """FlowOutput plus the log-determinant of every fiber: per layer [B, H, W]. Fibers are
    transformed independently, so log_jac_det [B] is the sum of these over all layers and pixels."""

    log_jac_det_maps: list[Tensor]


@register_method("cflow")
class CFlow(nn.Module):
    """One conditional flow ("decoder") per encoder layer, on single feature vectors."""

    config_class = CFlowConfig

    def __init__(self, config: CFlowConfig, feature_channels: Sequence[int]):
        super().__init__()
        self.config = config
        self.feature_channels = list(feature_channels)
        with seeded_construction(config.seed) as generator:
            self.decoders = nn.ModuleList(
                all_in_one_flow(
                    (channels,),
                    config.coupling_blocks,
                    fc_subnet(config.subnet_hidden_ratio),
                    generator,
                    clamp=config.clamp,
                    cond_channels=config.cond_channels,
                    global_affine_type=config.global_affine_type,
                    permute_soft=config.permute_soft,
                )
                for channels in self.feature_channels
            )
        # Order of training fibers; None = torch's default generator (seeded and checkpointed by the loop).
        self.fiber_generator: torch.Generator | None = None
        self._position_codes: dict[tuple, Tensor] = {}  # fixed, so computed once per size and device

    def _position_fibers(self, x: Tensor) -> Tensor:
        """The positional code of every fiber of x [B, C, H, W]: [B*H*W, cond_channels]."""
        batch, _, height, width = x.shape
        key = (height, width, x.device, x.dtype)
        if key not in self._position_codes:
            code = positional_encoding_2d(self.config.cond_channels, height, width, device=x.device, dtype=x.dtype)
            self._position_codes[key] = code.flatten(1).T.contiguous()  # [H*W, P], row by row
        return self._position_codes[key].repeat(batch, 1)

    def _decode(self, layer: int, fibers: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
        return self.decoders[layer](fibers, c=[codes])

    def forward(self, features: list[Tensor]) -> CFlowOutput:
        """All fibers of every layer through its decoder; latents reshaped back to [B, C, H, W]."""
        latents, jac_maps = [], []
        for layer, x in enumerate(features):
            batch, _, height, width = x.shape
            fibers, codes = to_fibers(x), self._position_fibers(x)
            parts = [
                self._decode(layer, fibers[i : i + FORWARD_CHUNK], codes[i : i + FORWARD_CHUNK])
                for i in range(0, fibers.shape[0], FORWARD_CHUNK)
            ]
            latents.append(from_fibers(torch.cat([z for z, _ in parts]), batch, height, width))
            jac_maps.append(torch.cat([j for _, j in parts]).reshape(batch, height, width))
        log_jac_det = sum(j.sum(dim=(1, 2)) for j in jac_maps)
        return CFlowOutput(latents, log_jac_det, jac_maps)

    def training_losses(self, features: list[Tensor]) -> Iterator[Tensor]:
        """One loss per fiber batch: layer by layer, all B*H*W fibers in a random order, cut into
        batches of fiber_batch_size (remainder dropped). The loop takes an optimiser step after each."""
        config = self.config
        for layer, x in enumerate(features):
            fibers, codes = to_fibers(x), self._position_fibers(x)
            if fibers.shape[0] < config.fiber_batch_size and x.shape[0] >= config.batch_size:
                raise ConfigError(
                    f"CFlow fiber_batch_size={config.fiber_batch_size} exceeds the {fibers.shape[0]} feature "
                    f"vectors of layer {layer} in a batch of {x.shape[0]} images ({tuple(x.shape[-2:])} maps), "
                    "so that decoder would never be trained; lower fiber_batch_size or raise batch_size or "
                    "input_size"
                )
            batches = fiber_batches(fibers.shape[0], config.fiber_batch_size, self.fiber_generator).to(x.device)
            for index in batches:
                # Each loss is back-propagated, whatever grad mode the features were produced under.
                with torch.enable_grad():
                    z, jac = self._decode(layer, fibers[index], codes[index])
                    loss = fiber_loss(log_likelihood_per_dim(z, jac))
                yield loss

    def loss(self, out: CFlowOutput) -> Tensor:
        """The training loss on every fiber at once: per layer the mean of -log(sigmoid(log p / C)),
        summed over layers (decoders are independent, so each gets its own layer's gradient)."""
        return sum(fiber_loss(m.flatten()) for m in self.log_likelihood_maps(out))

    def log_likelihood_maps(self, out: CFlowOutput) -> list[Tensor]:
        """Per layer log p / C of every pixel's fiber, log-determinant included: [B, H, W]."""
        maps = []
        for z, jac in zip(out.latents, out.log_jac_det_maps):
            batch, _, height, width = z.shape
            maps.append(log_likelihood_per_dim(to_fibers(z), jac.flatten()).reshape(batch, height, width))
        return maps
