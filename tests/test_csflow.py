"""CS-Flow: parameter counts (derived from the architecture, for parity checks against other
implementations), exact log-determinants, invertibility, the three-scale EfficientNet features,
the image score and the (non-original) pixel map, and a short run of the shared training loop."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from harness.errors import ConfigError
from harness.flows import FlowOutput, soft_clamp
from harness.profile import trainable_parameters
from harness.scoring import score
from harness.train import MAPS, load_maps
from methods import build_model, create_method, list_methods
from methods.csflow import (
    CSFlow,
    CSFlowConfig,
    CrossScaleBlock,
    MultiScaleEfficientNet,
    stage_channels,
    stage_stride,
    static_same_pads,
)

TINY = [4, 4, 4]
TINY_SIZES = (4, 2, 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small convolutions on a shared two-core machine run several times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def brute_force_log_det(function, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of a map R^n -> R^n at x, from the full Jacobian."""
    jacobian = torch.autograd.functional.jacobian(function, x)
    return torch.linalg.slogdet(jacobian.reshape(x.numel(), x.numel()))[1]


def tiny_features(batch=1, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=generator, dtype=dtype) for c, s in zip(TINY, TINY_SIZES)]


def randomise_gammas(model: torch.nn.Module, seed: int = 1) -> None:
    """Move the output scales away from 0 (at 0 every block is the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "gammas" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def tiny_model(kernel_sizes=(3, 5)) -> CSFlow:
    config = create_method("csflow", hidden_channels=6, kernel_sizes=kernel_sizes)
    model = build_model(config, TINY).double()
    randomise_gammas(model)
    return model


# --- parameter counts ----------------------------------------------------------------------------


def cross_convolution_parameters(c_in: int, c_out: int, hidden: int, k: int, scales: int = 3) -> int:
    """Per scale conv(k) c_in -> hidden and conv(k) hidden -> c_out; per neighbouring pair one
    upward and one strided conv(k) hidden -> c_out; biases everywhere; one gamma per scale."""
    inner = scales * (c_in * hidden * k * k + hidden)
    outer = (scales + 2 * (scales - 1)) * (hidden * c_out * k * k + c_out)
    return inner + outer + scales


def csflow_parameters(channels: int, hidden: int, kernel_sizes) -> int:
    half = channels // 2  # both subnets: half -> 2 * half channels (304 is even)
    return sum(2 * cross_convolution_parameters(half, 2 * half, hidden, k) for k in kernel_sizes)


def test_parameter_count_of_the_official_flow():
    # Flow parameters do not depend on the input size (fully convolutional): same at 768 and 256.
    with torch.device("meta"):  # 275M parameters: count them without allocating them
        model = build_model(create_method("csflow"), [304, 304, 304])
    assert trainable_parameters(model) == {
        "blocks.0": 47_638_694,
        "blocks.1": 47_638_694,
        "blocks.2": 47_638_694,
        "blocks.3": 132_311_206,
        "total": 275_227_288,
    }
    assert csflow_parameters(304, 1024, (3, 3, 3, 5)) == 275_227_288


# --- configuration and features --------------------------------------------------------------------


def test_registered_with_the_official_defaults():
    assert "csflow" in list_methods()
    config = create_method("csflow")
    assert (config.backbone, config.block_stage, config.n_scales, config.input_size) == (
        "tf_efficientnet_b5.aa_in1k", 5, 3, (768, 768))
    assert (config.kernel_sizes, config.hidden_channels, config.clamp, config.leaky_slope) == (
        (3, 3, 3, 5), 1024, 3.0, 0.1)
    assert (config.lr, config.adam_eps, config.weight_decay, config.grad_clip, config.batch_size) == (
        2e-4, 1e-4, 1e-5, 1.0, 16)
    assert (config.epochs, config.eval_every, config.augment) == (240, 60, False)
    spec = config.scoring()
    assert (spec.image_reduction, spec.pixel_aggregation, spec.align_corners) == ("latent_mean", "finest", False)


def test_efficientnet_b5_stage_has_304_channels_at_stride_32():
    with torch.device("meta"):
        b5 = timm.create_model("tf_efficientnet_b5", pretrained=False)
    assert stage_channels(b5, 5) == 304 and stage_stride("tf_efficientnet_b5", 5) == 32
    assert sum(len(stage) for stage in b5.blocks[:6]) == 36  # blocks 0..35: the official block 35
    # 768 px -> 24 / 12 / 6; anomalib's 256 px -> 8 / 4 / 2.
    assert [768 // 2**s // 32 for s in range(3)] == [24, 12, 6]


def test_invalid_settings_name_the_setting():
    with pytest.raises(ConfigError, match="input_size"):
        create_method("csflow", input_size=(300, 300))  # three scales need a multiple of 128
    create_method("csflow", input_size=(256, 256))  # anomalib's default size is fine
    with pytest.raises(ConfigError, match="kernel_sizes"):
        create_method("csflow", kernel_sizes=(3, 4))
    with pytest.raises(ConfigError, match="block_stage"):
        create_method("csflow", block_stage=9)
    with pytest.raises(ConfigError, match="scales"):
        build_model(create_method("csflow"), [304, 304])


def test_features_are_three_downscaled_copies_through_one_backbone():
    torch.manual_seed(0)
    extractor = MultiScaleEfficientNet("tf_efficientnet_b0", block_stage=5, pretrained=False)
    images = torch.randn(2, 3, 128, 128)
    features = extractor(images)
    assert extractor.channels == [192, 192, 192]
    assert [tuple(f.shape) for f in features] == [(2, 192, 4, 4), (2, 192, 2, 2), (2, 192, 1, 1)]
    with torch.no_grad():
        half = extractor.blocks(extractor.stem(F.interpolate(images, size=(64, 64), mode="nearest")))
    torch.testing.assert_close(features[1], half)
    extractor.train()
    assert not extractor.blocks.training  # BatchNorm statistics stay frozen
    assert "blocks=0-5" in extractor.cache_key() and "down=nearest" in extractor.cache_key()


# --- flow ------------------------------------------------------------------------------------------


def test_block_log_det_matches_brute_force_jacobian():
    model = tiny_model(kernel_sizes=(3,))
    block: CrossScaleBlock = model.blocks[0]
    features = tiny_features()
    flat = torch.cat([f.flatten() for f in features])

    def transform(v: torch.Tensor) -> torch.Tensor:
        xs, start = [], 0
        for f in features:
            xs.append(v[start:start + f.numel()].reshape(f.shape))
            start += f.numel()
        return torch.cat([z.flatten() for z in block(xs)[0]])

    _, log_det = block(features)
    torch.testing.assert_close(log_det[0], brute_force_log_det(transform, flat))


def test_model_log_det_matches_brute_force_and_inverts():
    model = tiny_model()
    features = tiny_features(batch=2)
    out = model(features)

    def transform(v: torch.Tensor) -> torch.Tensor:
        xs, start = [], 0
        for f in features:
            xs.append(v[start:start + f[:1].numel()].reshape(f[:1].shape))
            start += f[:1].numel()
        return torch.cat([z.flatten() for z in model(xs).latents])

    for i in range(2):
        flat = torch.cat([f[i].flatten() for f in features])
        torch.testing.assert_close(out.log_jac_det[i], brute_force_log_det(transform, flat))
    for x, x_back in zip(features, model.inverse(out.latents)):
        torch.testing.assert_close(x_back, x)


def test_blocks_start_as_channel_permutations():
    model = build_model(create_method("csflow", hidden_channels=6), TINY).double()
    features = tiny_features(batch=2)
    out = model(features)
    assert torch.all(out.log_jac_det == 0)
    for x, z in zip(features, out.latents):
        torch.testing.assert_close(z.sort(dim=1).values, x.sort(dim=1).values)


def test_soft_clamp_bounds_the_log_scales():
    s = torch.tensor([-1e6, -3.0, 0.0, 0.5, 1e6])
    e = soft_clamp(s, 3.0)
    assert torch.all(e.abs() < 3.0) and e[2] == 0
    torch.testing.assert_close(e[3], torch.tensor(3 * 0.636 * math.atan(0.5 / 3)))


def test_loss_is_per_latent_dimension():
    model = tiny_model()
    features = tiny_features(batch=3)
    out = model(features)
    z = torch.cat([latent.flatten(1) for latent in out.latents], dim=1)
    assert z.shape[1] == 4 * (16 + 4 + 1)
    expected = (0.5 * z.pow(2).sum(dim=1) - out.log_jac_det).mean() / z.shape[1]
    torch.testing.assert_close(model.loss(out), expected)


# --- scoring ---------------------------------------------------------------------------------------


def test_image_score_is_the_mean_of_half_squared_latents_and_the_map_uses_the_finest_scale():
    config = CSFlowConfig(hidden_channels=6)
    model = build_model(config, [8, 8, 8])
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(3, 8, s, s, generator=generator) * (1 + k) for k, s in enumerate((8, 4, 2))]
    out = FlowOutput(latents, torch.zeros(3))
    scores = score(model.log_likelihood_maps(out), (32, 32), config.scoring())
    official = torch.cat([z.flatten(1) for z in latents], dim=1).pow(2).div(2).mean(dim=1)
    torch.testing.assert_close(scores.image, official)
    # Pixel map (U-Flow authors' evaluation, not CS-Flow's): mean_c z^2 / 2 of the finest scale.
    finest = F.interpolate(latents[0].pow(2).mean(dim=1, keepdim=True) / 2, size=(32, 32), mode="bilinear",
                           align_corners=False)[:, 0]
    assert scores.pixel_map.shape == (3, 32, 32)
    torch.testing.assert_close(scores.pixel_map, finest)
    torch.testing.assert_close(scores.pro_map, finest)


# --- efficientnet_pytorch 0.7's padding, fixed for 456 px ----------------------------------------------


def test_padding_fixed_for_456_px_differs_in_blocks_13_and_27_only():
    fixed = static_same_pads("tf_efficientnet_b5", 5, 456)
    # blocks 13 and 27 of efficientnet_pytorch's B5 = the first blocks of timm's stages 3 and 5
    assert fixed["blocks.3.0.conv_dw"] == (1, 1, 1, 1) and fixed["blocks.5.0.conv_dw"] == (2, 2, 2, 2)
    for size in (768, 384, 192):  # the three scales CS-Flow feeds it; timm pads for the actual size
        actual = static_same_pads("tf_efficientnet_b5", 5, size)
        assert actual.keys() == fixed.keys()
        differing = {name for name in fixed if fixed[name] != actual[name]}
        assert differing == {"blocks.3.0.conv_dw", "blocks.5.0.conv_dw"}
        assert actual["blocks.3.0.conv_dw"] == (0, 1, 0, 1) and actual["blocks.5.0.conv_dw"] == (1, 2, 1, 2)


def test_fixed_padding_moves_the_features_and_is_a_no_op_at_its_own_size():
    images = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))

    def features(padding_size):
        torch.manual_seed(0)  # the same random weights each time
        # up to stage 3, whose first block pads (1, 1) when fixed for 456 px and (0, 1) at 128
        return MultiScaleEfficientNet("tf_efficientnet_b0", 3, 1, pretrained=False,
                                      static_padding_size=padding_size)(images)[0]

    timm_padding = features(None)
    assert torch.equal(features(128), timm_padding)  # fixed for the actual size = timm's own padding
    assert not torch.allclose(features(456), timm_padding)
    assert "pad=static456" in MultiScaleEfficientNet("tf_efficientnet_b0", 2, 1, pretrained=False,
                                                     static_padding_size=456).cache_key()


# --- the shared loop -------------------------------------------------------------------------------

# Random EfficientNet features shrink ~4x per stage (std ~3e-4 at stage 5), which leaves little to
# learn from; stage 2 (40 channels, stride 8: maps 16 / 8 / 4 at 128 px) keeps usable features.
SMALL = {"backbone": "tf_efficientnet_b0", "block_stage": 2, "input_size": (128, 128),
         "hidden_channels": 32, "batch_size": 8, "lr": 1e-3}


@pytest.fixture(scope="module")
def short_run(train_small):
    """3 epochs on weave with random EfficientNet-B0 features."""
    return train_small("csflow", "weave", SMALL, epochs=3, eval_every=3)


def test_short_run_lowers_the_loss_and_detects_anomalies(short_run):
    _, summary = short_run
    losses = [row["loss"] for row in summary["history"]]
    assert losses[-1] < losses[0]
    assert summary["last"]["image_auroc"] > 0.65


def test_stored_maps_give_maps_at_input_resolution(short_run):
    spec = short_run[0].spec
    stored = load_maps(spec.out_dir / MAPS)
    assert [tuple(m.shape[1:]) for m in stored.log_likelihoods] == [(16, 16), (8, 8), (4, 4)]
    assert stored.channels == [40, 40, 40]
    config = CSFlowConfig(**SMALL)
    scores = score(stored.log_likelihoods, config.input_size_for("weave"), config.scoring())
    n = len(stored.labels)
    assert scores.pixel_map.shape == (n, 128, 128) and scores.image.shape == (n,)
