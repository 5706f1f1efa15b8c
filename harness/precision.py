"""Numerical precision, compilation and memory layout of the flows: run settings shared by every
method, applied to a built model by the training loop.

  fp32   float32 everywhere, TF32 off for CUDA matmuls and convolutions (PyTorch's default lets
         cuDNN convolutions use TF32; here fp32 means float32). The reference precision: the
         official protocol uses it unless a run asks for another.
  tf32   float32 tensors; CUDA matmuls and convolutions on TF32 tensor cores (10-bit mantissa,
         float32 range). Nothing changes on the CPU.
  bf16   the flow subnets (the networks that predict each coupling's log-scale and shift, where
         nearly all the arithmetic is) run under bfloat16 autocast, and their outputs are cast
         back to float32 before the coupling uses them: the affine transform, the latents, the
         log-determinant, the squared-norm sum and the loss stay float32. The backbone stays
         float32 (its features are computed once per class for most methods).
  amp    the earlier name of bf16; accepted and recorded as bf16.

``compile`` wraps every flow (FrEIA block sequences and multi-scale couplings) in torch.compile,
forward and backward; parameters keep their names, so checkpoints do not depend on it.
``channels_last`` stores 4-D weights and feature maps as NHWC, which suits tensor-core
convolutions on a GPU (and the channel LayerNorm of the MSFlow subnets).
"""

from __future__ import annotations

import types
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from harness.config import canonical_precision
from harness.errors import ConfigError


def set_matmul_precision(precision: str) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions on (tf32) or off (fp32, bf16). Process-wide."""
    tf32 = canonical_precision(precision) == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


# --------------------------------------------------------------------------- the flows of a model


def coupling_subnets(model: nn.Module) -> Iterator[nn.Module]:
    """The subnets of every coupling: FrEIA's AllInOneBlock.subnet and the two subnets of the
    multi-scale couplings (CS-Flow, MSFlow's fusion flow)."""
    import FrEIA.modules as Fm

    from harness.flows import ParallelAffineCoupling

    for module in model.modules():
        if isinstance(module, Fm.AllInOneBlock):
            yield module.subnet
        elif isinstance(module, ParallelAffineCoupling):
            yield module.subnet_1
            yield module.subnet_2


def flows(model: nn.Module) -> list[nn.Module]:
    """The outermost flow modules of a model (FrEIA sequences, multi-scale couplings)."""
    import FrEIA.framework as Ff

    from harness.flows import ParallelAffineCoupling

    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if isinstance(module, (Ff.SequenceINN, ParallelAffineCoupling)):
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return found


def _as_float32(out):
    if isinstance(out, Tensor):
        return out.float()
    if isinstance(out, (list, tuple)):
        return type(out)(_as_float32(o) for o in out)
    return out


def _autocast_forward(self: nn.Module, *args, **kwargs):
    """A subnet's own forward under autocast, its output back in float32."""
    with torch.autocast(self.autocast_device_type, dtype=self.autocast_dtype):
        out = type(self).forward(self, *args, **kwargs)
    return _as_float32(out)


def autocast_subnets(model: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Run every coupling subnet of ``model`` under autocast with float32 outputs; returns how
    many. The forward is replaced on each subnet instance (a bound method, so copies of the
    model keep it), leaving parameter names and the state dict unchanged."""
    count = 0
    for subnet in coupling_subnets(model):
        subnet.autocast_device_type = device_type
        subnet.autocast_dtype = dtype
        subnet.forward = types.MethodType(_autocast_forward, subnet)
        count += 1
    if count == 0:
        raise ConfigError(
            f"precision=bf16: {type(model).__name__} has no coupling subnets this loop knows how to "
            "autocast; use precision=fp32 or tf32"
        )
    return count


def compile_flows(model: nn.Module, backend: str = "inductor") -> int:
    """torch.compile every flow of ``model`` in place (forward and, through AOTAutograd, backward);
    returns how many. ``backend="aot_eager"`` captures the same graphs without generating kernels
    (seconds instead of minutes on a CPU; what the tests use)."""
    targets = flows(model)
    if not targets:
        raise ConfigError(f"compile=true: {type(model).__name__} has no flow this loop knows how to compile")
    for flow in targets:
        flow.compile(backend=backend)
    return len(targets)


def to_channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def prepare_model(model: nn.Module, device: torch.device, precision: str, compile: bool = False,
                  channels_last: bool = False) -> nn.Module:
    """Apply the run's precision, memory layout and compilation to a built model (in place)."""
    precision = canonical_precision(precision)
    set_matmul_precision(precision)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if precision == "bf16":
        autocast_subnets(model, device.type, torch.bfloat16)
    if compile:
        compile_flows(model)
    return model
