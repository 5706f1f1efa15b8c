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


def method_info(method: str, overrides: dict[str, Any] | None = None,
                size: tuple[int, int] | None = None, class_name: str = "") -> dict[str, Any]:
    """What ``flowad info METHOD`` prints: trainable parameters per component and forward compute
    of the backbone and the flows at one input size (default: the method's own for ``class_name``).

    Backbone weights are random here (only shapes matter), so this needs no download. The
    forward passes run on the meta device: shapes and operation counts without the arithmetic,
    which at 512 px would cost every pipeline stage seconds of CPU."""
    from methods.registry import build_model, create_method

    config = create_method(method, **(overrides or {}))
    height, width = size or config.input_size_for(class_name)
    extractor = config.feature_extractor(pretrained=False).eval().to("meta")
    image = torch.zeros(1, 3, height, width, device="meta")
    backbone_gmacs = forward_gmacs(extractor, image)
    with torch.no_grad():
        features = extractor(image)
    model = build_model(config, extractor.channels).eval().to("meta")
    flow_gmacs = forward_gmacs_by_component(model, features)
    return {
        "method": method,
        "overrides": overrides or {},
        "input_size": [height, width],
        "feature_shapes": [list(f.shape[1:]) for f in features],
        "trainable_parameters": trainable_parameters(model),
        "gmacs": {"backbone": backbone_gmacs, "flows": flow_gmacs},
        "gflops": {"backbone": 2 * backbone_gmacs, "flows": 2 * flow_gmacs["total"]},
        "note": "GMAC = 1e9 multiply-accumulates counted by torch FlopCounterMode (convolutions and "
                "matrix products); GFLOPs = 2 x GMAC. Papers often call GMAC 'GFLOPs'.",
    }


def fusion_vs_cross_scale(overrides: dict[str, Any] | None = None,
                          size: tuple[int, int] | None = None) -> dict[str, Any]:
    """MSFlow's fusion flow against CS-Flow's cross-scale flows on the same features (the paper's
    efficiency claim: -93 % flow compute): trainable parameters and forward multiply-accumulates
    of MSFlow's parallel flows, its fusion flow, and CS-Flow's four cross-scale coupling blocks
    (official kernel sizes and hidden width) built on MSFlow's pooled stage maps."""
    from harness.errors import ConfigError
    from harness.flows import seeded_construction
    from methods.csflow import CSFlowConfig, CrossScaleBlock
    from methods.registry import build_model, create_method

    config = create_method("msflow", **(overrides or {}))
    height, width = size or config.input_size_for("")
    # Shapes only: the backbone and the flows run on the meta device (no memory, no arithmetic);
    # MSFlow's flows are built on the CPU first (their permutations are written at construction).
    with torch.device("meta"):
        extractor = config.feature_extractor(pretrained=False).eval()
        features = extractor(torch.zeros(1, 3, height, width))
    model = build_model(config, extractor.channels).eval().to("meta")
    if model.fusion_flow is None:
        raise ConfigError("the fusion comparison needs MSFlow with fusion=true")
    parallel = forward_gmacs_by_component(model, features)
    with torch.no_grad():
        latents = model(features).latents
    fusion_gmacs = forward_gmacs(model.fusion_flow, latents)
    cs = CSFlowConfig()
    with torch.device("meta"), seeded_construction(cs.seed) as generator:
        cross_scale = nn.ModuleList(
            CrossScaleBlock(extractor.channels, k, cs.hidden_channels, cs.leaky_slope, cs.clamp, generator)
            for k in cs.kernel_sizes
        ).eval()

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        xs = list(features)
        for block in cross_scale:
            xs, _ = block(xs)
    cross_gmacs = counter.get_total_flops() / 2e9
    parallel_gmacs = sum(v for k, v in parallel.items() if k.startswith("parallel_flows."))
    return {
        "input_size": [height, width],
        "feature_shapes": [list(f.shape[1:]) for f in features],
        "parallel_flows": {"parameters": sum(_trainable(f.parameters()) for f in model.parallel_flows),
                           "gmacs": parallel_gmacs},
        "fusion_flow": {"parameters": _trainable(model.fusion_flow.parameters()), "gmacs": fusion_gmacs},
        "cross_scale_flow": {"parameters": _trainable(cross_scale.parameters()), "gmacs": cross_gmacs,
                             "blocks": len(cs.kernel_sizes), "kernel_sizes": list(cs.kernel_sizes),
                             "hidden_channels": cs.hidden_channels},
        "fusion_compute_vs_cross_scale": fusion_gmacs / cross_gmacs - 1,
        "note": "CS-Flow's coupling blocks (methods/csflow.py) on MSFlow's features; GMAC as in method_info.",
    }
