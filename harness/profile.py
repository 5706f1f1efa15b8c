"""Model size and compute: trainable parameters and forward multiply-accumulates per component.

Components are a module's top-level children; a child that is a ModuleList or ModuleDict is
broken into its elements ("parallel_flows.0", "parallel_flows.1", ...), so a per-scale stack of
flows is reported per scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def components(module: nn.Module) -> dict[str, nn.Module]:
    parts: dict[str, nn.Module] = {}
    for name, child in module.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            for key, element in child.named_children():
                parts[f"{name}.{key}"] = element
        else:
            parts[name] = child
    return parts


def _trainable(parameters) -> int:
    return sum(p.numel() for p in parameters if p.requires_grad)


def trainable_parameters(module: nn.Module) -> dict[str, int]:
    """Trainable (requires_grad) parameter count per component, plus "total"."""
    counts = {name: _trainable(part.parameters()) for name, part in components(module).items()}
    own = _trainable(module.parameters(recurse=False))
    if own:
        counts["(own)"] = own
    counts["total"] = _trainable(module.parameters())
    return counts


@torch.no_grad()
def forward_gmacs_by_component(module: nn.Module, *inputs: Any) -> dict[str, float]:
    """Forward multiply-accumulates (10^9) per component and "total", counted by PyTorch's
    FlopCounterMode (matrix products and convolutions; MACs = FLOPs / 2). Elementwise operations
    are not counted. Inputs may live on the meta device: only shapes matter."""
    counter = FlopCounterMode(display=False)
    with counter:
        module(*inputs)
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(module).__name__
    result = {name: per_module.get(f"{root}.{name}", 0) / 2e9 for name in components(module)}
    result["total"] = counter.get_total_flops() / 2e9
    return result


def forward_gmacs(module: nn.Module, *inputs: Any) -> float:
    """Total forward multiply-accumulates in 10^9 for module(*inputs)."""
    return forward_gmacs_by_component(module, *inputs)["total"]
