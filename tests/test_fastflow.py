"""FastFlow: backbone presets, parameter counts (derived from the architecture, for parity checks
against other implementations), the transformer token-map features, the reference's scoring and
loss, and a short run of the shared training loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from harness.errors import ConfigError
from harness.flows import FlowOutput
from harness.profile import trainable_parameters
from harness.scoring import score
from harness.train import MAPS, load_maps
from methods import build_model, create_method, list_methods
from methods.fastflow import PRESETS, FastFlow, FastFlowConfig, VisionTransformerFeatures

RESNET18 = [64, 128, 256]
WRN50 = [256, 512, 1024]
SIZES_256 = [(64, 64), (32, 32), (16, 16)]  # stages 1-3 at 256 px


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small convolutions on a shared two-core machine run several times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- analytic parameter counts -------------------------------------------------------------------


def flow_step_parameters(channels: int, kernel: int, hidden_ratio: float) -> int:
    """One AllInOneBlock: conv(k) c_in -> hidden, conv(k) hidden -> 2*(C//2), with biases,
    plus the per-channel global affine scale and offset."""
    c_in, c_out = channels - channels // 2, 2 * (channels // 2)
    hidden = int(c_in * hidden_ratio)
    return (c_in * hidden * kernel**2 + hidden) + (hidden * c_out * kernel**2 + c_out) + 2 * channels


def fastflow_parameters(channels, sizes, steps, hidden_ratio, conv3x3_only, layer_norm=True) -> int:
    total = 0
    for c, (h, w) in zip(channels, sizes):
        kernels = [3 if (i % 2 == 0 or conv3x3_only) else 1 for i in range(steps)]
        total += sum(flow_step_parameters(c, k, hidden_ratio) for k in kernels)
        total += 2 * c * h * w if layer_norm else 0  # LayerNorm over [C, H, W], weight and bias
    return total


@pytest.mark.parametrize(
    "overrides, channels, expected",
    [
        # reference resnet18 setting (3x3 kernels in every step)
        ({"backbone": "resnet18"}, RESNET18, {"norms.0": 524_288, "norms.1": 262_144, "norms.2": 131_072,
                                              "flows.0": 222_976, "flows.1": 888_320, "flows.2": 3_546_112,
                                              "total": 5_574_912}),
        # anomalib's resnet18 setting (alternating 3x3 / 1x1)
        ({"backbone": "resnet18", "conv3x3_only": False}, RESNET18, {"flows.0": 124_672, "flows.1": 495_104,
                                                                      "flows.2": 1_973_248, "total": 3_510_528}),
        ({}, WRN50, {"norms.0": 2_097_152, "norms.1": 1_048_576, "norms.2": 524_288,
                     "flows.0": 1_973_248, "flows.1": 7_878_656, "flows.2": 31_485_952, "total": 45_007_872}),
    ],
    ids=["resnet18-256", "resnet18-256-alternating", "wide_resnet50_2-256"],
)
def test_parameter_counts_of_resnet_presets(overrides, channels, expected):
    config = create_method("fastflow", **overrides)
    settings = config.resolved()
    counts = trainable_parameters(build_model(config, channels))
    assert {key: counts[key] for key in expected} == expected
    assert counts["total"] == fastflow_parameters(
        channels, SIZES_256, settings.flow_steps, settings.hidden_ratio, settings.conv3x3_only
    )


def test_parameter_count_of_the_deit_preset():
    # One 768-channel scale, 20 steps, hidden int(384 * 0.16) = 61, no trainable norm. The CaiT
    # preset has the same channels and flow settings, hence the same count.
    config = create_method("fastflow", backbone="deit_base_distilled_patch16_384")
    counts = trainable_parameters(build_model(config, [768]))
    assert counts == {"flows.0": 7_074_500, "total": 7_074_500}
    assert counts["total"] == fastflow_parameters([768], [(24, 24)], 20, 0.16, False, layer_norm=False)
    cait = PRESETS["cait_m48_448"]
    assert (cait.flow_steps, cait.hidden_ratio, cait.conv3x3_only) == (20, 0.16, False)


# --- configuration -------------------------------------------------------------------------------


def test_registered_with_the_reference_defaults():
    assert "fastflow" in list_methods()
    config = create_method("fastflow")
    assert config.backbone == "wide_resnet50_2.racm_in1k"
    settings = config.resolved()
    assert (settings.input_size, settings.stages, settings.flow_steps, settings.hidden_ratio) == (
        (256, 256), (1, 2, 3), 8, 1.0)
    assert settings.conv3x3_only is False
    assert (config.clamp, config.lr, config.weight_decay, config.batch_size) == (2.0, 1e-3, 1e-5, 32)
    assert (config.epochs, config.eval_every, config.grad_clip, config.augment) == (500, 10, None, False)
    assert config.input_size_for("carpet") == (256, 256)
    assert config.feature_sizes() == SIZES_256


def test_backbone_presets_fill_unset_settings_and_keep_overrides():
    assert create_method("fastflow", backbone="resnet18").backbone == "resnet18.a1_in1k"
    assert create_method("fastflow", backbone="resnet18").resolved().conv3x3_only is True
    assert create_method("fastflow", backbone="resnet18.tv_in1k").backbone == "resnet18.tv_in1k"
    deit = create_method("fastflow", backbone="deit_base_distilled_patch16_384").resolved()
    assert (deit.family, deit.input_size, deit.last_block, deit.flow_steps, deit.hidden_ratio) == (
        "vit", (384, 384), 7, 20, 0.16)
    cait = create_method("fastflow", backbone="cait_m48_448")
    assert cait.backbone == "cait_m48_448.fb_dist_in1k" and cait.resolved().last_block == 40
    assert create_method("fastflow", flow_steps=4, input_size=[128, 128]).resolved().flow_steps == 4
    # Overrides applied to an existing config (dataclasses.replace) re-read the new preset.
    switched = dataclasses.replace(create_method("fastflow"), backbone="deit_base_distilled_patch16_384")
    assert switched.resolved().flow_steps == 20 and switched.resolved().input_size == (384, 384)


def test_invalid_settings_name_the_setting():
    with pytest.raises(ConfigError, match="backbone"):
        create_method("fastflow", backbone="resnet_nope")
    with pytest.raises(ConfigError, match="input_size"):
        create_method("fastflow", backbone="resnet34")  # no preset: the input size must be given
    with pytest.raises(ConfigError, match="last_block"):
        create_method("fastflow", backbone="deit_tiny_patch16_224", input_size=(64, 64))
    with pytest.raises(ConfigError, match="flow_steps"):
        create_method("fastflow", flow_steps=0)
    with pytest.raises(ConfigError, match="feature scales"):
        build_model(create_method("fastflow"), [256, 512])


def test_optimiser_and_constant_schedule():
    config = create_method("fastflow", backbone="resnet18", input_size=(64, 64), flow_steps=2)
    model = build_model(config, RESNET18)
    optimizer = config.make_optimizer(model.parameters())
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == 1e-3 and optimizer.param_groups[0]["weight_decay"] == 1e-5
    scheduler = config.make_scheduler(optimizer)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 1e-3


# --- transformer features ----------------------------------------------------------------------


@pytest.mark.parametrize("name, prefix_tokens", [("deit_tiny_distilled_patch16_224", 2), ("cait_xxs24_224", 1)])
def test_vit_token_map_matches_timm_when_all_blocks_are_used(name, prefix_tokens):
    torch.manual_seed(0)
    n_blocks = 12 if name.startswith("deit") else 24
    extractor = VisionTransformerFeatures(name, n_blocks - 1, (64, 64), pretrained=False)
    images = torch.randn(2, 3, 64, 64)
    (tokens,) = extractor(images)
    assert tokens.shape == (2, 192, 4, 4) and extractor.channels == [192]
    with torch.no_grad():
        # timm: all blocks + final norm (CaiT: its class token only joins after the blocks).
        reference = extractor.model.forward_features(images)[:, prefix_tokens:]
    torch.testing.assert_close(tokens, reference.transpose(1, 2).reshape(2, 192, 4, 4))


def test_vit_preset_style_model_on_a_tiny_transformer():
    config = create_method(
        "fastflow", backbone="deit_tiny_distilled_patch16_224", input_size=(64, 64), last_block=1, flow_steps=2
    )
    extractor = config.feature_extractor(pretrained=False)
    assert len(extractor.model.blocks) == 2  # later blocks are dropped
    assert "blocks=0-1+norm" in extractor.cache_key() and "weights=random" in extractor.cache_key()
    model = build_model(config, extractor.channels)
    assert model.norms is None  # the transformer's own final norm, frozen, takes its place
    out = model(extractor(torch.randn(2, 3, 64, 64)))
    assert [tuple(z.shape) for z in out.latents] == [(2, 192, 4, 4)] and out.log_jac_det.shape == (2,)
    with pytest.raises(ConfigError, match="last_block"):
        VisionTransformerFeatures("deit_tiny_distilled_patch16_224", 12, (64, 64), pretrained=False)


# --- loss and scoring ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model() -> FastFlow:
    config = create_method("fastflow", backbone="resnet18", input_size=(64, 64), flow_steps=2)
    return build_model(config, RESNET18)


def test_loss_is_the_sum_over_scales_of_batch_means(small_model):
    torch.manual_seed(0)
    features = [torch.randn(3, c, s, s) for c, s in zip(RESNET18, (16, 8, 4))]
    with torch.no_grad():
        out = small_model(features)
        per_scale = []
        for norm, flow, x in zip(small_model.norms, small_model.flows, features):
            z, jac = flow(norm(x))
            per_scale.append(torch.mean(0.5 * z.pow(2).sum(dim=(1, 2, 3)) - jac))
        torch.testing.assert_close(small_model.loss(out), sum(per_scale))


def test_scoring_reproduces_the_reference_map_and_image_score(small_model):
    torch.manual_seed(1)
    latents = [torch.randn(4, c, s, s) * (1 + torch.rand(4, 1, s, s)) for c, s in zip(RESNET18, (16, 8, 4))]
    out = FlowOutput(latents, torch.zeros(4))
    scores = score(small_model.log_likelihood_maps(out), (64, 64), small_model.config.scoring())
    # Reference: mean over scales of -exp(-0.5 mean_c z^2), each upsampled bilinearly
    # (align_corners=False); image score = max of the map. Ours is that map + 1.
    reference = torch.stack([
        F.interpolate(-torch.exp(-0.5 * z.pow(2).mean(dim=1, keepdim=True)), size=(64, 64), mode="bilinear",
                      align_corners=False)[:, 0]
        for z in latents
    ]).mean(dim=0)
    assert scores.pixel_map.shape == (4, 64, 64)
    torch.testing.assert_close(scores.pixel_map, 1 + reference)
    torch.testing.assert_close(scores.pro_map, 1 + reference)
    torch.testing.assert_close(scores.image, 1 + reference.flatten(1).amax(dim=1))


# --- the shared loop -----------------------------------------------------------------------------

SMALL = {"backbone": "resnet18", "input_size": (64, 64), "flow_steps": 2, "batch_size": 8}


@pytest.fixture(scope="module")
def short_run(train_small):
    """4 epochs on granite with random resnet18 features (maps 16/8/4)."""
    return train_small("fastflow", "granite", SMALL, epochs=4, eval_every=4)


def test_short_run_lowers_the_loss_and_detects_anomalies(short_run):
    _, summary = short_run
    losses = [row["loss"] for row in summary["history"]]
    assert losses[-1] < losses[0]
    assert summary["last"]["image_auroc"] > 0.7
    assert summary["last"]["pixel_auroc"] > 0.7


def test_stored_maps_give_maps_at_input_resolution(short_run):
    spec = short_run[0].spec
    stored = load_maps(spec.out_dir / MAPS)
    assert [tuple(m.shape[1:]) for m in stored.log_likelihoods] == [(16, 16), (8, 8), (4, 4)]
    assert stored.channels == RESNET18
    config = FastFlowConfig(**SMALL)
    scores = score(stored.log_likelihoods, config.input_size_for("granite"), config.scoring())
    n = len(stored.labels)
    assert scores.pixel_map.shape == (n, 64, 64) and scores.image.shape == (n,)
