"""CFlow-AD: official settings, parameter parity, fiber batching, loss, learning-rate schedule,
augmentation, test-set-global scoring (spec 3.4) and a short training run on the embedded dataset."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness.errors import ConfigError
from harness.flows import positional_encoding_2d
from harness.profile import trainable_parameters
from harness.scoring import score
from harness.train import MAPS, evaluate_scores, load_maps
from methods import build_model, create_method, list_methods
from methods.cflow import (
    CFlow,
    CFlowConfig,
    fiber_batches,
    learning_rate,
    random_rotation_augment,
)

WRN50 = [512, 1024, 2048]  # layer2-4


def tiny_model(channels=(6, 10), **overrides) -> CFlow:
    settings = {**dict(coupling_blocks=2, cond_channels=8, fiber_batch_size=4, batch_size=2), **overrides}
    return build_model(create_method("cflow", **settings), list(channels))


def tiny_features(channels=(6, 10), sizes=((3, 3), (2, 3)), batch=2, seed=0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, *hw, generator=generator) for c, hw in zip(channels, sizes)]


def manual_log_p(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
    """Spec 3.3 literally: C * (-0.5 ln 2 pi) - 0.5 ||z||^2 + logdet, per fiber (not divided)."""
    channels = z.shape[1]
    return channels * (-0.5 * math.log(2 * math.pi)) - 0.5 * (z**2).sum(dim=1) + log_jac_det


# --- settings --------------------------------------------------------------------------------------


def test_official_defaults():
    config = create_method("cflow")
    assert "cflow" in list_methods() and isinstance(config, CFlowConfig)
    assert config.feature_extractor_kwargs() == dict(
        backbone="wide_resnet50_2.tv_in1k", stages=(2, 3, 4), pool="none", padding_mode="reflect"
    )
    sizes = {name: config.input_size_for(name)[0] for name in (
        "bottle", "carpet", "grid", "leather", "screw", "tile", "toothbrush", "wood", "zipper",
        "cable", "capsule", "hazelnut", "metal_nut", "pill", "transistor", "granite", "01")}
    assert sizes == {**{n: 512 for n in ("bottle", "carpet", "grid", "leather", "screw", "tile", "toothbrush",
                                         "wood", "zipper")},
                     **{n: 256 for n in ("cable", "capsule", "hazelnut", "metal_nut", "pill", "granite", "01")},
                     "transistor": 128}
    assert (config.coupling_blocks, config.clamp, config.cond_channels, config.permute_soft) == (8, 1.9, 128, True)
    assert config.global_affine_type == "SOFTPLUS" and config.subnet_hidden_ratio == 2.0
    assert (config.lr, config.batch_size, config.fiber_batch_size) == (2e-4, 32, 256)
    assert (config.epochs, config.eval_every, config.grad_clip, config.augment) == (200, 8, None, True)
    spec = config.scoring()
    assert (spec.image_aggregation, spec.pixel_aggregation, spec.pro_aggregation) == ("add", "add", "add")
    assert (spec.normalisation, spec.image_reduction, spec.align_corners) == ("set", "max", True)
    assert create_method("cflow", normalisation="image").scoring().normalisation == "image"
    # YAML gives lists; the config keeps tuples.
    assert create_method("cflow", stages=[3, 4], input_size=[128, 128]).stages == (3, 4)


@pytest.mark.parametrize(
    "setting",
    [dict(normalisation="batch"), dict(fiber_batch_size=0), dict(cond_channels=6), dict(global_affine_type="TANH"),
     dict(rotation_degrees=-1.0), dict(warmup_meta_epochs=30)],
    ids=lambda s: next(iter(s)),
)
def test_invalid_settings_name_the_setting(setting):
    with pytest.raises(ConfigError, match=next(iter(setting))):
        create_method("cflow", **setting)


# --- parameter parity --------------------------------------------------------------------------------


def analytic_decoder_parameters(channels: int, blocks: int = 8, cond: int = 128) -> int:
    """Per block: Linear(d_in -> 2 d_in) + Linear(2 d_in -> d_out) with biases, plus the global affine
    scale and offset (C each). d_in = (C - C//2) + cond, d_out = 2 * (C//2)."""
    d_in, d_out = channels - channels // 2 + cond, 2 * (channels // 2)
    hidden = 2 * d_in
    return blocks * (d_in * hidden + hidden + hidden * d_out + d_out + 2 * channels)


def test_parameter_count_wrn50_official():
    # Hard permutations here only because drawing three 8-block sets of SO(C) rotations up to C=2048
    # takes minutes on a small CPU; the rotation is not trainable (next test), so counts are equal.
    model = build_model(create_method("cflow", permute_soft=False), WRN50)
    counts = trainable_parameters(model)
    assert counts == {
        "decoders.0": 5_523_456,
        "decoders.1": 17_074_176,
        "decoders.2": 59_049_984,
        "total": 81_647_616,
    }
    assert [counts[f"decoders.{i}"] for i in range(3)] == [analytic_decoder_parameters(c) for c in WRN50]


def test_soft_permutation_is_a_fixed_rotation():
    soft, hard = tiny_model(permute_soft=True), tiny_model(permute_soft=False)
    assert trainable_parameters(soft) == trainable_parameters(hard)
    assert trainable_parameters(soft)["total"] == sum(analytic_decoder_parameters(c, 2, 8) for c in (6, 10))
    block = soft.decoders[1].module_list[0]
    rotation = block.w_perm.detach().double().reshape(10, 10)
    assert not block.w_perm.requires_grad
    assert torch.allclose(rotation @ rotation.T, torch.eye(10, dtype=torch.float64), atol=1e-6)
    assert torch.det(rotation).item() == pytest.approx(1.0, abs=1e-5)
    assert (rotation.abs() > 1e-3).sum() > 10  # a dense rotation, not a permutation
    # Built from the config's seed: the same model every time, the global random state untouched.
    state = torch.get_rng_state()
    again = tiny_model(permute_soft=True)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(soft.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


# --- fibers and loss -----------------------------------------------------------------------------------


def test_fiber_batches_drop_the_remainder_and_follow_the_seed():
    batches = fiber_batches(1000, 256, torch.Generator().manual_seed(3))
    assert batches.shape == (3, 256)  # floor(1000 / 256); 232 fibers dropped
    assert batches.unique().numel() == 768 and batches.max() < 1000
    again = fiber_batches(1000, 256, torch.Generator().manual_seed(3))
    other = fiber_batches(1000, 256, torch.Generator().manual_seed(4))
    assert torch.equal(batches, again) and not torch.equal(batches, other)
    assert fiber_batches(100, 256).shape == (0, 256)


def test_one_loss_per_fiber_batch_layer_by_layer():
    model = tiny_model(fiber_batch_size=4)
    features = tiny_features(sizes=((3, 3), (2, 3)), batch=2)  # 18 and 12 fibers -> 4 + 3 batches
    model.fiber_generator = torch.Generator().manual_seed(0)
    losses = list(model.training_losses(features))
    assert len(losses) == 18 // 4 + 12 // 4
    assert all(loss.dim() == 0 and loss.requires_grad for loss in losses)
    model.fiber_generator = torch.Generator().manual_seed(0)
    assert torch.equal(torch.stack(losses), torch.stack(list(model.training_losses(features))))


def test_fiber_loss_matches_the_spec_by_hand():
    model = tiny_model(fiber_batch_size=4)
    features = tiny_features(batch=2)
    model.fiber_generator = torch.Generator().manual_seed(5)
    losses = [loss.detach() for loss in model.training_losses(features)]

    generator = torch.Generator().manual_seed(5)
    expected = []
    for layer, x in enumerate(features):
        b, c, h, w = x.shape
        code = positional_encoding_2d(8, h, w)
        # fiber k of the flat order is image k // (h*w), row (k % (h*w)) // w, column k % w
        fibers = torch.stack([x[k // (h * w), :, (k % (h * w)) // w, k % w] for k in range(b * h * w)])
        codes = torch.stack([code[:, (k % (h * w)) // w, k % w] for k in range(b * h * w)])
        order = torch.randperm(b * h * w, generator=generator)
        for i in range((b * h * w) // 4):
            index = order[4 * i : 4 * i + 4]
            z, jac = model.decoders[layer](fibers[index], c=[codes[index]])
            log_p = manual_log_p(z, jac)
            expected.append(-torch.log(torch.sigmoid(log_p / c)).mean().detach())
    assert torch.allclose(torch.stack(losses), torch.stack(expected), atol=1e-6)


def brute_force_log_det(function, x: torch.Tensor) -> torch.Tensor:
    jacobian = torch.autograd.functional.jacobian(function, x)
    return torch.linalg.slogdet(jacobian.reshape(x.numel(), x.numel()))[1]


def test_log_det_is_per_fiber_and_exact():
    model = tiny_model(permute_soft=True).double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move the global affine away from its initial identity
        for name, parameter in model.named_parameters():
            if name.endswith(("global_scale", "global_offset")):
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    fiber = torch.randn(1, 10, generator=generator, dtype=torch.float64)
    code = torch.randn(1, 8, generator=generator, dtype=torch.float64)
    _, jac = model.decoders[1](fiber, c=[code])
    exact = brute_force_log_det(lambda v: model.decoders[1](v, c=[code])[0], fiber)
    # The rotation counts as volume preserving; stored in float32 its log|det| is ~1e-7, not 0.
    assert jac.item() == pytest.approx(exact.item(), abs=1e-6)


def test_forward_gives_maps_and_per_pixel_log_likelihoods():
    model = tiny_model()
    features = tiny_features(batch=2)
    with torch.no_grad():
        out = model(features)
        maps = model.log_likelihood_maps(out)
    assert [z.shape for z in out.latents] == [x.shape for x in features]
    assert [m.shape for m in maps] == [(2, 3, 3), (2, 2, 3)]
    assert torch.allclose(out.log_jac_det, sum(j.sum(dim=(1, 2)) for j in out.log_jac_det_maps))
    # Pixel (b, y, x) of layer 1 is that fiber alone through the decoder, log p / C with its log-det.
    x = features[1]
    fiber, code = x[1, :, 1, 2][None], positional_encoding_2d(8, 2, 3)[:, 1, 2][None]
    with torch.no_grad():
        z, jac = model.decoders[1](fiber, c=[code])
    assert torch.allclose(out.latents[1][1, :, 1, 2], z[0], atol=1e-6)
    assert maps[1][1, 1, 2].item() == pytest.approx((manual_log_p(z, jac) / 10).item(), abs=1e-5)
    # loss(out): the fiber loss on all fibers of each layer, summed over layers.
    expected = sum(-torch.log(torch.sigmoid(m.flatten())).mean() for m in maps)
    assert model.loss(out).item() == pytest.approx(expected.item(), rel=1e-6)


def test_fiber_batch_larger_than_a_layer_is_an_error():
    model = tiny_model(fiber_batch_size=100, batch_size=2)
    with pytest.raises(ConfigError, match="fiber_batch_size"):
        list(model.training_losses(tiny_features(batch=2)))


# --- learning rate -------------------------------------------------------------------------------------


def test_learning_rate_schedule():
    config = create_method("cflow")
    eta_min = 2e-4 * 1e-3

    def cosine(meta_epoch: int) -> float:
        return eta_min + (2e-4 - eta_min) * (1 + math.cos(math.pi * meta_epoch / 25)) / 2

    end_of_warmup = cosine(2)
    assert end_of_warmup == pytest.approx(1.96861e-4, rel=1e-5)
    expected = {
        0: 2e-5,
        1: 2e-5 + (end_of_warmup - 2e-5) / 16,
        8: 2e-5 + (end_of_warmup - 2e-5) / 2,
        15: 2e-5 + 15 * (end_of_warmup - 2e-5) / 16,
        16: end_of_warmup,
        23: end_of_warmup,
        24: cosine(3),
        100: cosine(12),
        199: cosine(24),
    }
    model = torch.nn.Linear(2, 2)
    optimizer = config.make_optimizer(model.parameters())
    scheduler = config.make_scheduler(optimizer)
    seen = {}
    for epoch in range(config.epochs):
        seen[epoch] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    for epoch, lr in expected.items():
        assert seen[epoch] == pytest.approx(lr, rel=1e-9), epoch
        assert learning_rate(config, epoch) == pytest.approx(lr, rel=1e-9)
    assert seen[199] == pytest.approx(9.88e-7, rel=1e-3)
    # Cosine part: constant within a meta-epoch, decreasing across meta-epochs.
    after = [seen[e] for e in range(16, 200)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert len(set(after)) == 23
    # Without warm-up the cosine starts at lr.
    assert learning_rate(create_method("cflow", warmup_meta_epochs=0), 0) == pytest.approx(2e-4)


# --- augmentation --------------------------------------------------------------------------------------


def test_rotation_augmentation():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    config = create_method("cflow")
    rotated = config.augment_images(images, torch.Generator().manual_seed(1))
    assert rotated.shape == images.shape and rotated.dtype == images.dtype
    assert not torch.equal(rotated, images)
    assert torch.equal(rotated, config.augment_images(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(rotated, config.augment_images(images, torch.Generator().manual_seed(2)))
    # Nearest interpolation (RandomRotation's default) only moves values: no new ones but the fill.
    black = [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]
    for channel in range(3):
        allowed = torch.cat([images[0, channel].flatten(), torch.tensor([black[channel]])])
        assert torch.isin(rotated[0, channel], allowed).all()
    # Corners come in black: the normalised value of 0 per channel.
    flat = torch.zeros(1, 3, 64, 64)
    corner = random_rotation_augment(flat, 5.0, torch.Generator().manual_seed(0))[0, :, 0, 0]
    assert torch.allclose(corner, torch.tensor(black))
    assert torch.equal(random_rotation_augment(images, 0.0), images)
    assert not create_method("cflow", rotation_degrees=0.0).augment


# --- scoring (spec 3.4) ----------------------------------------------------------------------------------


def spec_3_4(log_likelihoods: list[torch.Tensor], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """CFlow's test-set-global scoring written out from the spec, in double precision, image by image."""
    n = log_likelihoods[0].shape[0]
    summed = torch.zeros(n, *size, dtype=torch.float64)
    for layer in log_likelihoods:
        layer = layer.double()
        probabilities = torch.exp(layer - layer.max())  # minus the maximum over the whole test set
        for i in range(n):
            summed[i] += F.interpolate(probabilities[i][None, None], size=size, mode="bilinear",
                                       align_corners=True)[0, 0]
    anomaly = summed.max() - summed
    return anomaly, anomaly.flatten(1).max(dim=1).values


def test_set_normalised_scoring_is_spec_3_4():
    generator = torch.Generator().manual_seed(0)
    logp = [torch.randn(5, s, s, generator=generator) * 2 - 3 for s in (16, 8, 4)]
    logp[0][2] -= 4  # one clearly anomalous image
    scores = score(logp, (32, 32), create_method("cflow").scoring())
    anomaly, image = spec_3_4(logp, (32, 32))
    for produced in (scores.pixel_map, scores.pro_map):
        assert produced.shape == (5, 32, 32)
        assert torch.allclose(produced.double(), anomaly, atol=1e-5)
    assert torch.allclose(scores.image.double(), image, atol=1e-5)
    # Set-wide normalisation: one image's map depends on the rest of the set.
    alone = score([m[:1] for m in logp], (32, 32), create_method("cflow").scoring())
    assert not torch.allclose(alone.pixel_map[0], scores.pixel_map[0])
    per_image = score(logp, (32, 32), create_method("cflow", normalisation="image").scoring())
    assert not torch.allclose(per_image.pixel_map, scores.pixel_map)


# --- a short training run ------------------------------------------------------------------------------

# CFlow's architecture at toy size: resnet18 layer2-4 at 128 px (maps 16/8/4), 2 coupling blocks with
# hard permutations (the rotations are covered above and slow to draw), the 40 training images in
# one batch, fiber batches of 512: an epoch is 20 + 5 + 1 optimiser steps.
SMALL = dict(
    backbone="resnet18.tv_in1k",
    input_size=(128, 128),
    coupling_blocks=2,
    cond_channels=16,
    permute_soft=False,
    fiber_batch_size=512,
    batch_size=40,
    lr=3e-3,
    meta_epochs=1,
    sub_epochs=2,
    warmup_meta_epochs=0,
)


@pytest.fixture(scope="module")
def trained(train_small):
    return train_small("cflow", "granite", SMALL)


def test_short_run_lowers_the_loss_and_scores_above_chance(trained):
    trainer, summary = trained
    losses = [row["loss"] for row in summary["history"]]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert [row["epoch"] for row in summary["history"] if "image_auroc" in row] == [2]  # once per meta-epoch
    assert summary["last"]["image_auroc"] > 0.7
    assert summary["last"]["pixel_auroc"] > 0.7
    assert not trainer.feature_cache  # augmentation: the encoder runs on every training batch


def test_maps_at_input_resolution(trained):
    trainer, summary = trained
    stored = load_maps(trainer.out / MAPS)
    n = len(trainer.test_set)
    assert [tuple(m.shape) for m in stored.log_likelihoods] == [(n, 16, 16), (n, 8, 8), (n, 4, 4)]
    assert stored.channels == [128, 256, 512]
    scores = score(stored.log_likelihoods, trainer.image_size, trainer.config.scoring())
    assert scores.pixel_map.shape == (n, 128, 128)
    assert torch.equal(scores.image, scores.pixel_map.flatten(1).amax(dim=1))
    assert evaluate_scores(scores, *trainer._ground_truth())["image_auroc"] == summary["last"]["image_auroc"]


# --- torch 1.8's zero_grad ---------------------------------------------------------------------------


@pytest.mark.parametrize("torch18", [True, False])
def test_torch18_zero_grad_keeps_moving_idle_decoders(torch18):
    """Train decoder 0 for one step, then decoder 1: with torch 1.8's zero-filled gradients Adam
    also moves decoder 0 on decoder 1's steps; with torch 2's dropped gradients it stays put."""
    model = tiny_model(permute_soft=False, torch18_zero_grad=torch18)
    optimizer = model.config.make_optimizer(model.parameters())
    losses = model.training_losses(tiny_features(batch=4))  # layer 0: 9 fiber batches of 4 ... layer 1
    first_decoder = list(model.decoders[0].parameters())
    steps_on_layer_0 = (4 * 3 * 3) // 4
    snapshot = None
    for step, loss in enumerate(losses):
        optimizer.zero_grad(set_to_none=True)  # as the loop asks
        loss.backward()
        optimizer.step()
        if step == steps_on_layer_0 - 1:
            snapshot = [p.detach().clone() for p in first_decoder]
    moved = any(not torch.equal(p, q) for p, q in zip(first_decoder, snapshot))
    assert moved is torch18


def test_torch18_zero_grad_is_the_official_default():
    assert CFlowConfig().torch18_zero_grad is True


def test_short_run_reports_cflow_own_pro(trained):
    _, summary = trained
    last = summary["last"]
    assert 0.0 <= last["aupro_cflow"] <= 1.5  # overlaps above 1 are possible on masks with holes
    assert "aupro_cflow" not in summary["history"][-1]  # computed once, on the final model
