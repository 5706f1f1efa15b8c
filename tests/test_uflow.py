"""U-Flow: parameter count of the official flow, exact log-determinant and invertibility of the
U-shaped flow, MS-CaiT features, settings, scoring, NFA metrics and a short training run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.errors import ConfigError, HarnessError
from harness.profile import trainable_parameters
from harness.scoring import score
from harness.train import EVAL_METRICS, rescore_maps
from methods import build_model, create_method, list_methods
from methods.uflow import TUNED_SETTINGS, MultiScaleCaiT, UFlow, UFlowConfig

MCAIT_CHANNELS = [768, 384]  # CaiT-M48 blocks 0-40 at 448 px (28x28), CaiT-S24 blocks 0-20 at 224 px (14x14)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast, and much faster on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brute_force_log_det(function, x: torch.Tensor) -> torch.Tensor:
    jacobian = torch.autograd.functional.jacobian(function, x, vectorize=True)
    return torch.linalg.slogdet(jacobian.reshape(x.numel(), x.numel()))[1]


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move the global affine scales/offsets and LayerNorms away from their initial values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("global_scale", "global_offset")) or "feature_norms" in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def as_flat_function(model: UFlow, shapes: list[tuple[int, ...]]):
    sizes = [math.prod(s) for s in shapes]

    def function(flat: torch.Tensor) -> torch.Tensor:
        features = [part.reshape(1, *s) for part, s in zip(torch.split(flat, sizes), shapes)]
        return torch.cat([z.flatten() for z in model(features).latents])

    return function


# --- architecture ---------------------------------------------------------------------------------


def expected_flow_parameters(channels: int, blocks: int = 4) -> int:
    """One stage of AllInOneBlocks on `channels`: subnet conv(c1 -> c1, k) + conv(c1 -> 2 c2, k)
    with biases (k = 3 on even blocks, 1 on odd), plus the global scale and offset (2 C)."""
    c1, c2 = channels - channels // 2, channels // 2
    total = 0
    for i in range(blocks):
        k = 3 if i % 2 == 0 else 1
        total += c1 * c1 * k * k + c1 + c1 * 2 * c2 * k * k + 2 * c2 + 2 * channels
    return total


def test_official_flow_parameter_count():
    model = build_model(create_method("uflow"), MCAIT_CHANNELS)
    counts = trainable_parameters(model)
    # coarse stage on 384 channels; fine stage on 768 + 192/4 = 816 channels; upsampling has none.
    assert model.stage_channels == [816, 384]
    assert counts["stages.1"] == expected_flow_parameters(384) == 2_217_216
    assert counts["stages.0"] == expected_flow_parameters(816) == 9_999_264
    assert counts["total"] == 12_216_480


def test_official_output_shapes_and_log_likelihood_maps():
    model = build_model(create_method("uflow"), MCAIT_CHANNELS)
    features = [torch.randn(2, 768, 4, 4), torch.randn(2, 384, 2, 2)]  # small maps: shapes only
    with torch.no_grad():
        out = model(features)
    assert [tuple(z.shape) for z in out.latents] == [(2, 816, 4, 4), (2, 192, 2, 2)]
    assert out.log_jac_det.shape == (2,)
    maps = model.log_likelihood_maps(out)
    assert [tuple(m.shape) for m in maps] == [(2, 4, 4), (2, 2, 2)]
    torch.testing.assert_close(maps[1], -0.5 * out.latents[1].pow(2).mean(dim=1))


@pytest.mark.parametrize(
    "backbone, channels, shapes, latent_channels",
    [
        # two scales (MS-CaiT layout): the coarse stage's 8 channels send 4 -> 1 channel at 2x size
        ("mcait", [3, 8], [(3, 4, 4), (8, 2, 2)], [4, 4]),
        # three scales, as with the ResNet alternative (input 16 px: maps 4, 2, 1)
        ("resnet18", [2, 7, 8], [(2, 4, 4), (7, 2, 2), (8, 1, 1)], [3, 4, 4]),
    ],
)
def test_log_det_matches_jacobian_and_flow_inverts(backbone, channels, shapes, latent_channels):
    config = create_method("uflow", backbone=backbone, input_size=(16, 16) if backbone != "mcait" else (64, 64),
                           coarse_input_size=(32, 32), blocks_per_stage=4)
    model = build_model(config, channels).double()
    perturb(model)
    model.feature_norms = None  # the ResNet LayerNorms come before the flow: not part of the density
    x = torch.randn(sum(math.prod(s) for s in shapes), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    function = as_flat_function(model, shapes)
    features = [part.reshape(1, *s) for part, s in zip(torch.split(x, [math.prod(s) for s in shapes]), shapes)]
    out = model(features)
    assert [z.shape[1] for z in out.latents] == latent_channels
    torch.testing.assert_close(out.log_jac_det[0], brute_force_log_det(function, x), rtol=1e-8, atol=1e-8)
    recovered = model.inverse(out.latents)
    for a, b in zip(recovered, features):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_resnet_alternative_normalises_features_with_trainable_layer_norms():
    config = create_method("uflow", backbone="resnet18", input_size=(64, 64))
    model = build_model(config, [64, 128, 256])
    shapes = [tuple(norm.normalized_shape) for norm in model.feature_norms]
    assert shapes == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]
    assert all(p.requires_grad for p in model.feature_norms.parameters())
    assert model.stage_channels == [64 + 20, 128 + 32, 256]


def test_model_is_a_function_of_its_seed():
    a, b = (build_model(create_method("uflow", seed=3), [3, 8]) for _ in range(2))
    c = build_model(create_method("uflow", seed=4), [3, 8])
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)


def test_loss_official_and_batch_sum_variant():
    model = build_model(create_method("uflow"), [3, 8])
    out = model([torch.randn(4, 3, 4, 4), torch.randn(4, 8, 2, 2)])
    z_term = sum(0.5 * z.pow(2).sum(dim=(1, 2, 3)) for z in out.latents)
    torch.testing.assert_close(model.loss(out), (z_term - out.log_jac_det).mean())
    old = build_model(create_method("uflow", loss_batch_sum_bug=True), [3, 8])
    torch.testing.assert_close(old.loss(out), z_term.sum() - out.log_jac_det.mean())


def test_channels_that_cannot_be_upsampled_are_refused():
    with pytest.raises(ConfigError, match="multiple of 4"):
        build_model(create_method("uflow"), [3, 6])


# --- settings --------------------------------------------------------------------------------------


def test_defaults_follow_the_specification():
    config = create_method("uflow")
    assert "uflow" in list_methods() and isinstance(config, UFlowConfig)
    assert (config.fine_backbone, config.fine_blocks) == ("cait_m48_448.fb_dist_in1k", 41)
    assert (config.coarse_backbone, config.coarse_blocks) == ("cait_s24_224.fb_dist_in1k", 21)
    assert config.input_size == (448, 448) and config.coarse_input_size == (224, 224)
    assert config.feature_sizes() == [(28, 28), (14, 14)]
    assert (config.blocks_per_stage, config.clamp, config.permute_soft, config.hidden_ratio) == (4, 2.0, False, 1.0)
    assert (config.lr, config.batch_size, config.epochs, config.weight_decay) == (1e-4, 8, 200, 1e-5)
    assert not config.augment and not config.loss_batch_sum_bug
    assert config.official_lower_tail  # the reference's NFA (the unified protocol turns it off)
    assert config.metric_size == (256, 256) and config.nfa_size == (256, 256)
    assert (config.image_resize, config.mask_resize) == ("bilinear_antialias", "bilinear")
    assert config.nfa_size == (256, 256) and config.input_size_for("bottle") == (448, 448)
    assert len(TUNED_SETTINGS) == 15
    spec = config.scoring()
    assert (spec.image_aggregation, spec.pixel_aggregation, spec.pro_aggregation) == ("mean",) * 3
    assert (spec.image_reduction, spec.align_corners) == ("max", False)


def test_tuned_per_class_settings():
    grid = create_method("uflow", tuned_class="grid")
    assert (grid.lr, grid.batch_size, grid.epochs) == (3.622e-5, 12, 500)
    mine = create_method("uflow", tuned_class="grid", lr=1e-3)  # a value set explicitly wins
    assert (mine.lr, mine.batch_size, mine.epochs) == (1e-3, 12, 500)
    other = create_method("uflow", tuned_class="weave")  # no tuned config: the default one
    assert (other.lr, other.batch_size, other.epochs) == (1e-4, 8, 200)


def test_optimizer_and_the_effectively_constant_schedule():
    config = create_method("uflow", tuned_class="screw")
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = config.make_optimizer([parameter])
    assert optimizer.defaults["weight_decay"] == 1e-5 and optimizer.defaults["lr"] == 4.156e-4
    scheduler = config.make_scheduler(optimizer)
    for _ in range(config.epochs):  # stepped once per epoch by the loop
        optimizer.step()
        scheduler.step()
    # 500 epochs of a 25000-step linear decay to 0.4: 1 - 0.6 * 500 / 25000 = 0.988
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4.156e-4 * 0.988)


@pytest.mark.parametrize(
    "overrides, setting",
    [
        ({"backbone": "vit_base"}, "backbone"),
        ({"coarse_input_size": (256, 256)}, "coarse_input_size"),
        ({"blocks_per_stage": 0}, "blocks_per_stage"),
        ({"backbone": "resnet18", "input_size": (100, 100)}, "input_size"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_configuration_errors_name_the_setting(overrides, setting):
    with pytest.raises(ConfigError, match=setting):
        create_method("uflow", **overrides)


# --- MS-CaiT features ---------------------------------------------------------------------------------


def test_ms_cait_features_with_tiny_random_cait():
    extractor = MultiScaleCaiT("cait_xxs24_224", 2, "cait_xxs24_224", 3, (64, 64), (32, 32), pretrained=False)
    assert extractor.channels == [192, 192]
    assert not any(p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert not extractor.training and not extractor.fine.training
    images = torch.randn(2, 3, 64, 64)
    fine, coarse = extractor(images)
    assert fine.shape == (2, 192, 4, 4) and coarse.shape == (2, 192, 2, 2)
    assert not fine.requires_grad
    torch.testing.assert_close(extractor(images)[0], fine)  # deterministic (no dropout)
    assert len(extractor.fine.blocks) == 2 and len(extractor.coarse.blocks) == 3
    key = extractor.cache_key()
    assert "cait_xxs24_224:blocks=2@64x64" in key and "blocks=3@32x32" in key and "random" in key
    # The fine map is CaiT's patch tokens after its norm, laid out row-major on the 4x4 grid.
    trunk = extractor.fine
    tokens = trunk.norm(trunk.blocks(trunk.patch_embed(images) + trunk.pos_embed))
    torch.testing.assert_close(fine[:, :, 1, 2], tokens[:, 1 * 4 + 2])
    model = build_model(create_method("uflow"), extractor.channels)
    assert [z.shape[1] for z in model(extractor(images)).latents] == [192 + 24, 96]


def test_missing_weights_give_an_actionable_error(tmp_path):
    with pytest.raises(HarnessError, match="fine_weights_path"):
        MultiScaleCaiT(fine_weights_path=tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="weight tag"):
        MultiScaleCaiT(fine_backbone="cait_m48_448", pretrained=True)


# --- scoring and NFA metrics -----------------------------------------------------------------------


def test_anomaly_map_is_one_minus_mean_likelihood():
    config = create_method("uflow")
    logp = [-torch.rand(3, 8, 8), -torch.rand(3, 4, 4)]
    scores = score(logp, (16, 16), config.scoring())
    up = [torch.nn.functional.interpolate(torch.exp(m)[:, None], size=(16, 16), mode="bilinear",
                                          align_corners=False)[:, 0] for m in logp]
    expected = 1 - (up[0] + up[1]) / 2
    torch.testing.assert_close(scores.pixel_map, expected)
    torch.testing.assert_close(scores.image, expected.flatten(1).amax(dim=1))


def test_extra_metrics_segment_a_planted_region():
    config = create_method("uflow", nfa_size=(56, 56))
    rng = np.random.default_rng(0)
    fine = rng.normal(size=(4, 816, 28, 28))
    masks = np.zeros((4, 112, 112), dtype=bool)
    fine[:2, :, 10:16, 12:18] *= math.sqrt(2.0)
    masks[:2, 40:64, 48:72] = True  # the same block at 4x the latent resolution
    coarse = rng.normal(size=(4, 192, 14, 14))
    logp = [torch.from_numpy(-0.5 * (z**2).mean(axis=1)).half() for z in (fine, coarse)]
    metrics = config.extra_metrics(logp, [816, 192], masks, (112, 112))
    assert set(metrics) == {"miou_nfa_fair", "miou_nfa_oracle", "nfa_oracle_threshold", "nfa_detected_fraction",
                            "nfa_flagged_good_images"}
    assert metrics["miou_nfa_fair"] > 0.85  # two good images without detections (1 each), two blocks found
    # the oracle is the best over thresholds that include the fair one (0)
    assert metrics["miou_nfa_oracle"] >= metrics["miou_nfa_fair"]
    assert -400 <= metrics["nfa_oracle_threshold"] <= 1000
    assert metrics["nfa_flagged_good_images"] == 0.0
    assert 0 < metrics["nfa_detected_fraction"] < 0.05


# --- a short training run ---------------------------------------------------------------------------

# The ResNet-18 alternative (random weights) at 64 px: maps 16, 8, 4; two blocks per stage.
SMALL = {"backbone": "resnet18", "input_size": (64, 64), "blocks_per_stage": 2, "batch_size": 8, "lr": 1e-3,
         "nfa_size": None}


@pytest.fixture(scope="module")
def short_trained(train_small):
    """(trainer, summary) of 4 epochs on weave."""
    return train_small("uflow", "weave", SMALL, epochs=4, eval_every=4)


@pytest.fixture(scope="module")
def short_run(short_trained):
    """The summary of 4 epochs on weave."""
    return short_trained[1]


def test_metrics_at_256_and_rescoring_gives_the_same_figures(short_trained):
    trainer, summary = short_trained
    assert trainer.metric_size == (256, 256) and trainer.image_size == (64, 64)
    result = trainer.evaluate()
    assert result.scores.pixel_map.shape[-2:] == (256, 256) and result.masks.shape[-2:] == (256, 256)
    assert all(m.dtype == torch.float32 for m in result.log_likelihoods_float32)
    assert all(torch.equal(a, b.half()) for a, b in zip(result.log_likelihoods, result.log_likelihoods_float32))
    rescored = rescore_maps(trainer.spec)
    assert {k: rescored[k] for k in EVAL_METRICS if k in rescored} == {
        k: summary["last"][k] for k in EVAL_METRICS if k in rescored}


def test_short_run_lowers_the_loss_and_scores_above_chance(short_run):
    losses = [row["loss"] for row in short_run["history"]]
    assert losses[-1] < losses[0]
    assert short_run["last"]["image_auroc"] > 0.8
    assert short_run["last"]["pixel_auroc"] > 0.8
    assert short_run["image_size"] == [64, 64]


def test_short_run_reports_the_nfa_segmentation(short_run):
    last = short_run["last"]
    assert 0.0 <= last["miou_nfa_fair"] <= last["miou_nfa_oracle"] <= 1.0
    assert 0.0 <= last["nfa_detected_fraction"] <= 1.0
    assert {"miou_fair", "miou_oracle"} <= set(last)
