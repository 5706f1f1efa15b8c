"""Per-scale log-likelihood maps -> anomaly maps and image scores.

Every method ends in the same place: for each test image and each scale, a map of log-likelihoods
(higher = more normal) at flow resolution. How those maps are combined is a method setting, and an
ablation, so it lives here and works on stored maps as well as on fresh ones.

Aggregations (all return "higher = more anomalous" maps at the input resolution):

- ``add``  (MSFlow pixel map): per scale P_l = exp(logp_l - max_image logp_l), upsampled, summed;
  A = max_image(sum) - sum.
- ``mul``  (MSFlow image map): sum of upsampled logp_l (a product of likelihoods), minus its
  per-image max, exp; A = 1 - exp(...).
- ``mean`` (FastFlow, U-Flow): A = 1 - mean over scales of exp(logp_l), upsampled; no normalisation.
- ``add`` with ``normalisation="set"`` (CFlow): the maxima are taken over the whole test set instead
  of per image, so one image's map depends on the others (as in the official CFlow code).
- ``finest`` (CS-Flow pixel map, as evaluated by the U-Flow authors): A = -logp of the scale with the
  most pixels, upsampled; the other scales are ignored; no normalisation.

Image scores are a reduction of the image map (``topk``, ``max``, ``mean``), except
``latent_mean`` (CS-Flow), which reads the per-scale maps at flow resolution: minus the mean of
every entry of every scale's log-likelihood map. With logp = -0.5 * mean_c z^2 and the same channel
count on every scale this is exactly the mean of z^2 / 2 over all latent entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from harness.errors import ConfigError

Aggregation = Literal["add", "mul", "mean", "finest"]
Normalisation = Literal["image", "set"]
AGGREGATIONS = ("add", "mul", "mean", "finest")
NORMALISATIONS = ("image", "set")
IMAGE_REDUCTIONS = ("topk", "max", "mean")
LATENT_REDUCTIONS = ("latent_mean",)  # from the per-scale maps, not from an anomaly map


def _upsample(maps: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=align_corners)[:, 0]


def _max_over(maps: torch.Tensor, normalisation: str) -> torch.Tensor:
    """Per-image maximum ([N, 1, 1]) or the test-set maximum (scalar), for broadcasting."""
    if normalisation == "image":
        return maps.amax(dim=(-2, -1), keepdim=True)
    return maps.amax()


def anomaly_maps(
    log_likelihoods: Sequence[torch.Tensor],
    size: tuple[int, int],
    aggregation: str = "add",
    normalisation: str = "image",
    align_corners: bool = True,
    chunk: int = 16,
) -> torch.Tensor:
    """Combine per-scale log-likelihood maps ``[N, h_l, w_l]`` into anomaly maps ``[N, H, W]``.

    Images are processed ``chunk`` at a time so a whole test set at 512x512 stays in memory bounds;
    with ``normalisation="set"`` the set-wide maxima are found first.
    """
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"aggregation={aggregation!r} is not known; use one of {AGGREGATIONS}")
    if normalisation not in NORMALISATIONS:
        raise ConfigError(f"normalisation={normalisation!r} is not known; use one of {NORMALISATIONS}")
    logp = [m.float() for m in log_likelihoods]
    n = logp[0].shape[0]
    scale_max = [_max_over(m, normalisation) for m in logp]

    def combine(part: slice) -> torch.Tensor:
        if aggregation == "finest":
            finest = max(logp, key=lambda m: m.shape[-2] * m.shape[-1])
            return _upsample(-finest[part], size, align_corners)
        if aggregation == "add":
            probs = [torch.exp(m[part] - (mx[part] if mx.dim() else mx)) for m, mx in zip(logp, scale_max)]
            return sum(_upsample(p, size, align_corners) for p in probs)
        if aggregation == "mul":
            return sum(_upsample(m[part], size, align_corners) for m in logp)
        return sum(_upsample(torch.exp(m[part]), size, align_corners) for m in logp) / len(logp)

    combined = torch.cat([combine(slice(i, i + chunk)) for i in range(0, n, chunk)])
    if aggregation == "finest":
        return combined
    if aggregation == "add":
        return _max_over(combined, normalisation) - combined
    if aggregation == "mul":
        return 1.0 - torch.exp(combined - _max_over(combined, normalisation))
    return 1.0 - combined


def image_scores(maps: torch.Tensor, reduction: str = "topk", top_k: float = 0.03) -> torch.Tensor:
    """Image scores ``[N]`` from anomaly maps ``[N, H, W]``.

    ``topk``: mean of the K = int(top_k * H * W) largest values (MSFlow; top_k=1.0 is the plain mean).
    """
    if reduction not in IMAGE_REDUCTIONS:
        raise ConfigError(f"image reduction={reduction!r} is not known; use one of {IMAGE_REDUCTIONS}")
    flat = maps.flatten(1)
    if reduction == "max":
        return flat.amax(dim=1)
    if reduction == "mean":
        return flat.mean(dim=1)
    if not 0.0 < top_k <= 1.0:
        raise ConfigError(f"top_k={top_k} must be a fraction in (0, 1]")
    k = max(1, int(top_k * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


def latent_mean_scores(log_likelihoods: Sequence[torch.Tensor]) -> torch.Tensor:
    """Image scores ``[N]``: minus the mean over every entry of every scale's map ``[N, h_l, w_l]``
    (each pixel of each scale weighs the same; CS-Flow's mean of z^2 / 2, see module docstring)."""
    return -torch.cat([m.float().flatten(1) for m in log_likelihoods], dim=1).mean(dim=1)


@dataclass(frozen=True)
class ScoringSpec:
    """Which map each metric reads. Defaults are MSFlow's: image and PRO on the multiplicative map,
    pixel AUROC on the additive map, image score = mean of the top 3 % of the map."""

    image_aggregation: str = "mul"
    pixel_aggregation: str = "add"
    pro_aggregation: str = "mul"
    normalisation: str = "image"
    image_reduction: str = "topk"
    top_k: float = 0.03
    align_corners: bool = True


@dataclass
class Scores:
    image: torch.Tensor  # [N]
    pixel_map: torch.Tensor  # [N, H, W], for pixel AUROC
    pro_map: torch.Tensor  # [N, H, W], for AU-PRO and mIoU


def score(log_likelihoods: Sequence[torch.Tensor], size: tuple[int, int], spec: ScoringSpec) -> Scores:
    """Anomaly maps and image scores from per-scale log-likelihood maps, as ``spec`` says."""
    cache: dict[str, torch.Tensor] = {}

    def map_for(aggregation: str) -> torch.Tensor:
        if aggregation not in cache:
            cache[aggregation] = anomaly_maps(
                log_likelihoods, size, aggregation, spec.normalisation, spec.align_corners
            )
        return cache[aggregation]

    if spec.image_reduction in LATENT_REDUCTIONS:
        image = latent_mean_scores(log_likelihoods)
    else:
        image = image_scores(map_for(spec.image_aggregation), spec.image_reduction, spec.top_k)
    return Scores(
        image=image,
        pixel_map=map_for(spec.pixel_aggregation),
        pro_map=map_for(spec.pro_aggregation),
    )
