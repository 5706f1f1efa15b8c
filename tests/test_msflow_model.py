"""MSFlow flows: parameter parity with the reference, exact log-determinants, invertibility,
determinism, ablation settings, outputs and the learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.errors import ConfigError
from harness.flows import all_in_one_flow, conv_subnet, positional_encoding_2d, seeded_construction
from harness.profile import forward_gmacs_by_component, trainable_parameters
from methods import build_model, create_method, list_methods
from methods.msflow import FusionFlow, MSFlow, MSFlowConfig, make_optimizer, make_scheduler

WRN50 = [256, 512, 1024]
RESNET18 = [64, 128, 256]
TINY = [4, 6, 8]


def brute_force_log_det(function, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of a map R^n -> R^n at x, from the full Jacobian."""
    jacobian = torch.autograd.functional.jacobian(function, x)
    return torch.linalg.slogdet(jacobian.reshape(x.numel(), x.numel()))[1]


def tiny_features(channels=TINY, sizes=(4, 2, 1), batch=1, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=generator, dtype=dtype) for c, s in zip(channels, sizes)]


def perturb_global_affine(model: torch.nn.Module) -> None:
    """Move the global scales and offsets away from their initial values (1 and 0)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("global_scale") or name.endswith("global_offset"):
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


# --- parameter parity ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wrn50_model() -> MSFlow:
    return build_model(create_method("msflow"), WRN50)


def test_parameter_parity_wrn50_default(wrn50_model):
    assert trainable_parameters(wrn50_model) == {
        "parallel_flows.0": 1_550_976,
        "parallel_flows.1": 11_993_280,
        "parallel_flows.2": 66_393_600,
        "fusion_flow": 19_618_368,
        "total": 99_556_224,
    }


@pytest.mark.parametrize(
    "channels, blocks, expected",
    [
        (RESNET18, (2, 5, 8), {"parallel_flows.0": 277_440, "parallel_flows.1": 1_478_400,
                               "parallel_flows.2": 6_203_904, "fusion_flow": 1_227_408, "total": 9_187_152}),
        (WRN50, (8, 8, 8), {"total": 111_405_120}),
        (WRN50, (2, 2, 2), {"total": 42_565_056}),
    ],
    ids=["resnet18-258", "wrn50-888", "wrn50-222"],
)
def test_parameter_parity_other_configs(channels, blocks, expected):
    counts = trainable_parameters(build_model(create_method("msflow", parallel_blocks=blocks), channels))
    assert {key: counts[key] for key in expected} == expected


def test_flow_macs_at_512_match_reference(wrn50_model):
    # Counted convolutions scale with h*w, so flow maps of 8/4/2 give exactly 1/64 of 64/32/16.
    features = [torch.randn(1, c, s, s) for c, s in zip(WRN50, (8, 4, 2))]
    gmacs = {k: 64 * v for k, v in forward_gmacs_by_component(wrn50_model, features).items()}
    assert gmacs["total"] == pytest.approx(48.7, abs=0.05)
    assert gmacs["fusion_flow"] == pytest.approx(9.1, abs=0.05)
    # The hard permutations run as 1x1 convolutions (C^2 h w MACs per block); without them the
    # parallel flows cost ~35.6 GMAC.
    permutations = sum(n * c * c * s * s for n, c, s in zip((2, 5, 8), WRN50, (64, 32, 16))) / 1e9
    parallel = sum(gmacs[f"parallel_flows.{i}"] for i in range(3))
    assert parallel - permutations == pytest.approx(35.6, abs=0.05)


# --- exact log-determinants and invertibility ------------------------------------------------------


def test_all_in_one_block_log_det_matches_jacobian():
    with seeded_construction(0) as generator:
        flow = all_in_one_flow((4, 1, 1), 1, conv_subnet("ln"), generator, clamp=1.9, cond_channels=4).double()
    perturb_global_affine(flow)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    cond = positional_encoding_2d(4, 3, 3, dtype=torch.float64)[None]

    z, log_det = flow(x, c=[cond])
    assert torch.allclose(log_det, brute_force_log_det(lambda v: flow(v, c=[cond])[0], x), atol=1e-8)
    x_back, log_det_back = flow(z, c=[cond], rev=True)
    assert torch.allclose(x_back, x, atol=1e-10)
    assert torch.allclose(log_det_back, -log_det, atol=1e-10)


def test_fusion_flow_log_det_matches_jacobian():
    with seeded_construction(0) as generator:
        fusion = FusionFlow(TINY, clamp=1.9, generator=generator).double()
    xs = tiny_features()
    sizes = [x.numel() for x in xs]

    def flat_fusion(flat: torch.Tensor) -> torch.Tensor:
        parts = [p.reshape(x.shape) for p, x in zip(torch.split(flat, sizes), xs)]
        return torch.cat([z.flatten() for z in fusion(parts)[0]])

    flat = torch.cat([x.flatten() for x in xs])
    zs, log_det = fusion(xs)
    assert log_det.abs().item() > 1e-3  # the coupling is not a trivial volume-preserving map
    assert torch.allclose(log_det, brute_force_log_det(flat_fusion, flat), atol=1e-8)
    xs_back, log_det_back = fusion(zs, rev=True)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(xs_back, xs))
    assert torch.allclose(log_det_back, -log_det, atol=1e-10)


def tiny_model(**overrides) -> MSFlow:
    settings = dict(cond_channels=4, parallel_blocks=(1, 2, 1))
    settings.update(overrides)
    channels = settings.pop("channels", TINY)
    return build_model(create_method("msflow", **settings), channels)


def test_whole_model_log_det_and_inverse():
    model = tiny_model().double()
    perturb_global_affine(model)
    xs = tiny_features()
    sizes = [x.numel() for x in xs]

    def flat_model(flat: torch.Tensor) -> torch.Tensor:
        parts = [p.reshape(x.shape) for p, x in zip(torch.split(flat, sizes), xs)]
        return torch.cat([z.flatten() for z in model(parts).latents])

    out = model(xs)
    flat = torch.cat([x.flatten() for x in xs])
    assert torch.allclose(out.log_jac_det, brute_force_log_det(flat_model, flat), atol=1e-8)
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(model.inverse(out.latents), xs))


# --- determinism --------------------------------------------------------------------------------------


def test_model_is_a_function_of_its_seed_and_leaves_global_rng_alone():
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    first, again, other = tiny_model(seed=5), tiny_model(seed=5), tiny_model(seed=6)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])

    a, b, c = first.state_dict(), again.state_dict(), other.state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    perms = [k for k in a if k.endswith("w_perm") or k.endswith(".perm")]
    assert perms and any(not torch.equal(a[k], c[k]) for k in perms)
    xs = tiny_features(dtype=torch.float32)
    assert torch.equal(first(xs).latents[2], again(xs).latents[2])


# --- outputs -----------------------------------------------------------------------------------------


def test_loss_and_log_likelihood_maps():
    model = tiny_model()
    xs = tiny_features(batch=3, sizes=(8, 4, 2), dtype=torch.float32)
    out = model(xs)
    assert [z.shape for z in out.latents] == [x.shape for x in xs]
    assert out.log_jac_det.shape == (3,)
    maps = model.log_likelihood_maps(out)
    assert [m.shape for m in maps] == [(3, 8, 8), (3, 4, 4), (3, 2, 2)]
    assert all((m <= 0).all() for m in maps)
    assert torch.allclose(maps[0], -0.5 * (out.latents[0] ** 2).mean(dim=1))
    expected = torch.mean(sum(0.5 * (z**2).sum(dim=(1, 2, 3)) for z in out.latents) - out.log_jac_det)
    assert torch.allclose(model.loss(out), expected)
    model.loss(out).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# --- ablations and configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(subnet_norm="none"),
        dict(subnet_norm="bn"),
        dict(subnet_norm="ln"),
        dict(pool="max"),
        dict(pool="none"),
        dict(pool_kernel=5),
        dict(fusion=False),
        dict(parallel_blocks=(1, 1, 1)),
        dict(parallel_blocks=(3, 3, 3)),
        dict(stages=(2, 3), parallel_blocks=(2, 3), channels=[6, 8]),
        dict(stages=(1, 2, 3, 4), parallel_blocks=(1, 1, 2, 2), channels=[4, 6, 8, 10]),
        dict(backbone="resnet18.tv_in1k"),
        dict(image_aggregation="add", pixel_aggregation="mul", top_k=1.0),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_ablation_settings_build_and_run(overrides):
    model = tiny_model(**overrides)
    channels = overrides.get("channels", TINY)
    xs = [torch.randn(2, c, s, s) for c, s in zip(channels, (8, 4, 2, 1))]
    out = model(xs)
    assert len(out.latents) == len(channels) and torch.isfinite(model.loss(out))
    if overrides.get("fusion") is False:
        assert model.fusion_flow is None and "fusion_flow" not in dict(model.named_children())


def test_defaults_follow_the_specification():
    config = create_method("msflow")
    assert isinstance(config, MSFlowConfig) and "msflow" in list_methods()
    assert config.backbone == "wide_resnet50_2.tv_in1k" and config.padding_mode == "reflect"
    assert (config.stages, config.pool, config.pool_kernel) == ((1, 2, 3), "avg", 3)
    assert config.input_size_for("bottle") == (512, 512) and config.input_size_for("transistor") == (256, 256)
    assert (config.parallel_blocks, config.subnet_norm, config.clamp, config.cond_channels) == ((2, 5, 8), "ln", 1.9, 64)
    assert (config.lr, config.batch_size, config.epochs, config.eval_every, config.grad_clip) == (1e-4, 8, 100, 4, 2.0)
    assert (config.top_k, config.image_aggregation, config.pixel_aggregation, config.seed) == (0.03, "mul", "add", 9826)
    assert create_method("msflow", parallel_blocks=[8, 8, 8]).parallel_blocks == (8, 8, 8)  # YAML lists


def test_configuration_errors_name_the_setting():
    with pytest.raises(ConfigError, match=r"'paralel_blocks'.*parallel_blocks"):
        create_method("msflow", paralel_blocks=(2, 5, 8))
    with pytest.raises(ConfigError, match="unknown method"):
        create_method("nope")
    with pytest.raises(ConfigError, match="parallel_blocks"):
        create_method("msflow", stages=(2, 3))
    with pytest.raises(ConfigError, match="subnet_norm"):
        create_method("msflow", subnet_norm="gn")
    with pytest.raises(ConfigError, match="feature scales"):
        build_model(create_method("msflow"), [4, 6])


# --- learning-rate schedule --------------------------------------------------------------------------


def test_learning_rate_schedule_per_epoch():
    config = create_method("msflow")
    optimizer = make_optimizer(config, [torch.nn.Parameter(torch.zeros(1))])
    scheduler = make_scheduler(config, optimizer)
    rates = []
    for _ in range(config.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for epoch in range(13):  # 1.00e-5, 1.75e-5, 2.50e-5, ..., 1.00e-4 at epoch 12
        assert rates[epoch] == pytest.approx(1e-5 + 7.5e-6 * epoch, rel=1e-9)
    assert rates[12:70] == pytest.approx([1e-4] * 58, rel=1e-9)
    assert rates[70:90] == pytest.approx([3.3e-5] * 20, rel=1e-9)
    assert rates[90:] == pytest.approx([1.089e-5] * 10, rel=1e-9)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999) and math.isclose(optimizer.defaults["lr"], 1e-4)


# --- condition ------------------------------------------------------------------------------------


def test_positional_encoding_layout():
    code = positional_encoding_2d(64, 5, 7)
    assert code.shape == (64, 5, 7)
    rows, cols = torch.meshgrid(torch.arange(5.0), torch.arange(7.0), indexing="ij")
    for i in range(16):  # 16 frequencies 10000^(-2i/32)
        frequency = 10000 ** (-2 * i / 32)
        assert torch.allclose(code[2 * i], torch.sin(cols * frequency), atol=1e-6)
        assert torch.allclose(code[2 * i + 1], torch.cos(cols * frequency), atol=1e-6)
        assert torch.allclose(code[32 + 2 * i], torch.sin(rows * frequency), atol=1e-6)
        assert torch.allclose(code[32 + 2 * i + 1], torch.cos(rows * frequency), atol=1e-6)
    with pytest.raises(ConfigError):
        positional_encoding_2d(30, 2, 2)
