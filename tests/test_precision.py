"""Precision, compilation and memory layout as run settings: each agrees with fp32 eager.

Tolerances, on one fixed batch of the MSFlow architecture (blocks 2, 5, 8 and the fusion flow):
bf16 subnets keep the loss, the log-determinant and the latents within 2 % (relative, as norms)
of fp32; torch.compile (graph capture) and channels_last within 1e-4 (float32 rounding from
reordered sums).
A short training run in bf16 gives image and pixel AUROC within 0.5 points of the same run in fp32.
"""

from __future__ import annotations

import pytest
import torch

from harness.config import RunSettings
from harness.errors import ConfigError
from harness.flows import FlowOutput
from harness.precision import autocast_subnets, compile_flows, coupling_subnets, prepare_model
from harness.synthetic import generate_embedded
from methods.registry import build_model, create_method

CHANNELS = (64, 128, 256)  # ResNet-18 stages 1-3
BF16_TOLERANCE = 2e-2
FLOAT32_TOLERANCE = 1e-4


def msflow(**overrides):
    torch.manual_seed(0)
    return build_model(create_method("msflow", **overrides), CHANNELS)


def fixed_batch(batch: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(batch, c, s, s, generator=generator) for c, s in zip(CHANNELS, (16, 8, 4))]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def outputs(model, features) -> tuple[FlowOutput, torch.Tensor]:
    out = model(features)
    return out, model.loss(out)


def assert_agree(out: FlowOutput, loss, ref: FlowOutput, ref_loss, tolerance: float) -> None:
    assert relative_error(loss, ref_loss) < tolerance
    assert relative_error(out.log_jac_det, ref.log_jac_det) < tolerance
    for z, z_ref in zip(out.latents, ref.latents):
        assert relative_error(z, z_ref) < tolerance


def test_precision_names():
    assert RunSettings(precision="amp").precision == "bf16"  # the earlier name, recorded as bf16
    assert RunSettings(precision="tf32").precision == "tf32"
    with pytest.raises(ConfigError, match="fp16.*fp32.*tf32.*bf16"):
        RunSettings(precision="fp16")


def test_bf16_subnets_agree_with_fp32_and_keep_the_sums_in_float32():
    features = fixed_batch()
    reference, model = msflow(), msflow()
    ref_out, ref_loss = outputs(reference, features)

    n_subnets = autocast_subnets(model, "cpu")
    assert n_subnets == sum(1 for _ in coupling_subnets(model)) == 2 + 5 + 8 + 2
    seen = []  # the dtype every convolution of a subnet computes in
    for subnet in coupling_subnets(model):
        for conv in (m for m in subnet.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out, loss = outputs(model, features)
    assert seen and set(seen) == {torch.bfloat16}
    assert loss.dtype == out.log_jac_det.dtype == torch.float32
    assert all(z.dtype == torch.float32 for z in out.latents)
    assert_agree(out, loss, ref_out, ref_loss, BF16_TOLERANCE)
    assert relative_error(loss, ref_loss) > 0  # the subnets did run in a coarser precision
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_cflow_fiber_losses_in_bf16_agree_with_fp32():
    channels = (32, 64)
    config = create_method("cflow", coupling_blocks=2, cond_channels=8, fiber_batch_size=64, batch_size=2)
    features = [torch.randn(2, c, 8, 8, generator=torch.Generator().manual_seed(2)) for c in channels]
    torch.manual_seed(0)
    reference = build_model(config, channels)
    torch.manual_seed(0)
    model = build_model(config, channels)
    autocast_subnets(model, "cpu")
    ref_out, out = reference(features), model(features)
    assert_agree(out, model.loss(out), ref_out, reference.loss(ref_out), BF16_TOLERANCE)


def test_channels_last_agrees_with_contiguous():
    features = fixed_batch()
    ref_out, ref_loss = outputs(msflow(), features)
    model = prepare_model(msflow(), torch.device("cpu"), "fp32", channels_last=True)
    out, loss = outputs(model, [f.contiguous(memory_format=torch.channels_last) for f in features])
    assert_agree(out, loss, ref_out, ref_loss, FLOAT32_TOLERANCE)


def test_compiled_flows_agree_with_eager_forward_and_backward():
    # The graphs torch.compile captures (TorchDynamo, AOTAutograd's forward and backward), run
    # without inductor's code generation, which takes minutes on two CPU cores.
    overrides = dict(parallel_blocks=(1, 1, 2))
    features = fixed_batch(2)
    reference, model = msflow(**overrides), msflow(**overrides)
    assert compile_flows(model, backend="aot_eager") == 4  # three parallel flows and the fusion coupling
    ref_out, ref_loss = outputs(reference, features)
    out, loss = outputs(model, features)
    assert_agree(out, loss, ref_out, ref_loss, FLOAT32_TOLERANCE)
    ref_loss.backward()
    loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is not None:
            assert relative_error(p.grad, q.grad) < 1e-3, name
    assert model.state_dict().keys() == reference.state_dict().keys()  # checkpoints unchanged


@pytest.fixture(scope="module")
def larger_test_set(tmp_path_factory):
    """One embedded class with 30 good and 30 defective test images: 900 pairs, so one swapped
    pair moves image AUROC by 0.11 points."""
    return generate_embedded(tmp_path_factory.mktemp("precision") / "data", seed=0, image_size=64,
                             n_test_good=30, n_test_per_defect=10, classes=["granite"])


@pytest.mark.slow
def test_short_bf16_run_within_half_a_point_of_fp32(larger_test_set, tmp_path):
    from harness.config import RunSpec
    from harness.train import Trainer

    small = {"backbone": "resnet18.tv_in1k", "input_size": (64, 64), "parallel_blocks": (1, 1, 2),
             "batch_size": 8, "warmup_meta_epochs": 0, "lr": 1e-3}
    results = {}
    for precision in ("fp32", "bf16"):
        spec = RunSpec(method="msflow", data_root=larger_test_set, class_name="granite",
                       out_dir=tmp_path / precision, overrides=small)
        settings = RunSettings(device="cpu", precision=precision, pretrained=False, progress=False,
                               tracking=False, figures=False, seed=0, epochs=2, eval_every=2)
        results[precision] = Trainer(spec, settings).fit()["last"]
    for metric in ("image_auroc", "pixel_auroc"):
        assert abs(results["bf16"][metric] - results["fp32"][metric]) <= 0.005, (metric, results)
    assert results["fp32"]["image_auroc"] != 0.5  # the comparison is of a model that ranks images
