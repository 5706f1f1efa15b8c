"""Our baselines beside anomalib's implementations of the same models: parameters and outputs.

    /path/to/anomalib-venv/bin/python benchmarks/parity_anomalib.py          # every configuration
    python benchmarks/parity_anomalib.py --anomalib-python /path/to/anomalib-venv/bin/python --vit

anomalib is not a dependency of this project: it lives in its own environment. The script runs
each side in its own interpreter (a subprocess per side, printing JSON) and combines them.

1. Trainable parameters of the flow part, for the configurations both projects can build:

  anomalib side   builds anomalib's torch models (anomalib.models.image.<m>.torch_model) with
                  random backbone weights and counts the parameters with requires_grad, leaving
                  out its backbone module (anomalib's CS-Flow leaves requires_grad=True on its
                  EfficientNet, which runs under no_grad and is never trained; that count is
                  reported separately)
  our side        runs our feature extractors on the meta device (shapes only, no weights) to get
                  the channels and map sizes, builds our model for them (methods.registry.build_model)
                  and counts it the same way

   The fixed permutation matrices of FrEIA's AllInOneBlock (parameters with requires_grad=False)
   are not counted. The trainable LayerNorms over a whole [C, H, W] feature map (FastFlow and
   U-Flow with ResNets) are counted on both sides and also listed on their own ("layernorm"),
   because their size follows the input size.

2. Same weights, same outputs (skip with --no-outputs): small models of each kind; anomalib's
   weights (perturbed, so that zero-initialised gates hide nothing) are copied into ours in a
   fixed order, both run the same random features, and latents, log-determinants, losses and
   scores are compared.

Offline: anomalib's CS-Flow and U-Flow constructors always ask for pretrained backbone weights
(torchvision's EfficientNet-B5 IMAGENET1K_V1; timm's cait_m48_448 / cait_s24_224 / ResNets). The
anomalib side replaces those calls with random-weight constructors of the same architectures
(only the weights differ, the parameter counts do not). cait_m48_448 (356 M parameters) is built
for real, with random weights (about 12 s and 2 GB on a CPU; twice with --vit).

Results: tables on stdout and benchmarks/results/parity_anomalib.{json,csv}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# One entry per configuration both projects can build. "ours": overrides of our method config;
# "anomalib": arguments of anomalib's torch model (plus "model": which one).
CONFIGS: list[dict[str, Any]] = [
    {
        "key": "fastflow_resnet18_256_alternating",
        "label": "FastFlow resnet18 @256, 8 steps, 3x3/1x1 alternating (anomalib 2.x default)",
        "method": "fastflow",
        "ours": {"backbone": "resnet18", "conv3x3_only": False},
        "anomalib": {"model": "fastflow", "backbone": "resnet18", "input_size": [256, 256], "flow_steps": 8,
                     "conv3x3_only": False, "hidden_ratio": 1.0},
    },
    {
        "key": "fastflow_resnet18_256_3x3",
        "label": "FastFlow resnet18 @256, 8 steps, 3x3 only (reference config; our preset; anomalib <=0.7 config)",
        "method": "fastflow",
        "ours": {"backbone": "resnet18"},
        "anomalib": {"model": "fastflow", "backbone": "resnet18", "input_size": [256, 256], "flow_steps": 8,
                     "conv3x3_only": True, "hidden_ratio": 1.0},
    },
    {
        "key": "fastflow_wide_resnet50_2_256",
        "label": "FastFlow wide_resnet50_2 @256, 8 steps, 3x3/1x1 alternating (both defaults)",
        "method": "fastflow",
        "ours": {"backbone": "wide_resnet50_2"},
        "anomalib": {"model": "fastflow", "backbone": "wide_resnet50_2", "input_size": [256, 256], "flow_steps": 8,
                     "conv3x3_only": False, "hidden_ratio": 1.0},
    },
    {
        "key": "cflow_wide_resnet50_2_layers2-4",
        "label": "CFlow wide_resnet50_2 layer2-4, 8 blocks, cond 128 (ours permute_soft=True, anomalib False)",
        "method": "cflow",
        "ours": {"backbone": "wide_resnet50_2.tv_in1k", "stages": [2, 3, 4]},
        "anomalib": {"model": "cflow", "backbone": "wide_resnet50_2", "layers": ["layer2", "layer3", "layer4"],
                     "coupling_blocks": 8, "condition_vector": 128, "clamp_alpha": 1.9, "permute_soft": False},
    },
    {
        "key": "csflow_efficientnet_b5_768",
        "label": "CS-Flow EfficientNet-B5 @768, 4 blocks (k 3,3,3,5), hidden 1024",
        "method": "csflow",
        "ours": {"input_size": [768, 768]},
        "anomalib": {"model": "csflow", "input_size": [768, 768], "cross_conv_hidden_channels": 1024,
                     "n_coupling_blocks": 4, "clamp": 3},
    },
    {
        "key": "csflow_efficientnet_b5_256",
        "label": "CS-Flow EfficientNet-B5 @256 (anomalib's default size), 4 blocks, hidden 1024",
        "method": "csflow",
        "ours": {"input_size": [256, 256]},
        "anomalib": {"model": "csflow", "input_size": [256, 256], "cross_conv_hidden_channels": 1024,
                     "n_coupling_blocks": 4, "clamp": 3},
    },
    {
        "key": "uflow_mcait_448",
        "label": "U-Flow MS-CaiT (cait_m48_448 + cait_s24_224) @448, 4 steps per stage",
        "method": "uflow",
        "ours": {},
        "anomalib": {"model": "uflow", "backbone": "mcait", "input_size": [448, 448], "flow_steps": 4},
    },
    {
        "key": "uflow_resnet18_256",
        "label": "U-Flow resnet18 @256 (stages 1-3 + LayerNorm), 4 steps per stage",
        "method": "uflow",
        "ours": {"backbone": "resnet18", "input_size": [256, 256]},
        "anomalib": {"model": "uflow", "backbone": "resnet18", "input_size": [256, 256], "flow_steps": 4},
    },
    {
        "key": "uflow_wide_resnet50_2_256",
        "label": "U-Flow wide_resnet50_2 @256 (stages 1-3 + LayerNorm), 4 steps per stage",
        "method": "uflow",
        "ours": {"backbone": "wide_resnet50_2", "input_size": [256, 256]},
        "anomalib": {"model": "uflow", "backbone": "wide_resnet50_2", "input_size": [256, 256], "flow_steps": 4},
    },
]
VIT_CONFIGS: list[dict[str, Any]] = [
    {
        "key": "fastflow_deit_384",
        "label": "FastFlow deit_base_distilled_patch16_384 @384, 20 steps, hidden 0.16",
        "method": "fastflow",
        "ours": {"backbone": "deit_base_distilled_patch16_384"},
        "anomalib": {"model": "fastflow", "backbone": "deit_base_distilled_patch16_384", "input_size": [384, 384],
                     "flow_steps": 20, "conv3x3_only": False, "hidden_ratio": 0.16},
    },
    {
        "key": "fastflow_cait_448",
        "label": "FastFlow cait_m48_448 @448, 20 steps, hidden 0.16",
        "method": "fastflow",
        "ours": {"backbone": "cait_m48_448"},
        "anomalib": {"model": "fastflow", "backbone": "cait_m48_448", "input_size": [448, 448],
                     "flow_steps": 20, "conv3x3_only": False, "hidden_ratio": 0.16},
    },
]

# Why a row's totals differ, or what could have made them differ but does not.
NOTES: dict[str, str] = {
    "fastflow_resnet18_256_alternating": "our resnet18 preset uses 3x3 kernels only (reference config); "
    "this row sets conv3x3_only=False on our side to match anomalib 2.x",
    "fastflow_resnet18_256_3x3": "anomalib 2.x defaults to conv3x3_only=False for resnet18; this row sets it "
    "True on the anomalib side (as its v0.3-0.7 configs did)",
    "cflow_wide_resnet50_2_layers2-4": "permute_soft only changes the fixed (non-trainable) mixing matrix, "
    "so the default difference (ours True as the official code, anomalib False) does not change the count",
    "csflow_efficientnet_b5_768": "anomalib: torchvision efficientnet_b5 features.6.8; ours: timm "
    "tf_efficientnet_b5 blocks[5]; both give 304 channels, and the flow's convolutions do not depend "
    "on the map size",
    "csflow_efficientnet_b5_256": "same flow as at 768 px: convolution weights do not depend on the map size",
    "uflow_mcait_448": "same MS-CaiT channels (768, 384); anomalib's split keeps C//8*4 channels for the "
    "upsampling, ours C//2: equal for these channel counts",
    "uflow_resnet18_256": "anomalib puts the trainable LayerNorms inside its feature extractor, we put "
    "them in the model: counted on both sides",
    "uflow_wide_resnet50_2_256": "as resnet18 (LayerNorms: 3.7 M of the 27.3 M)",
    "fastflow_deit_384": "the transformer's own final norm is frozen on both sides",
    "fastflow_cait_448": "the transformer's own final norm is frozen on both sides",
}


# --------------------------------------------------------------------------- shared counting


def count_parameters(model, backbone_children: tuple[str, ...] = ()) -> dict[str, Any]:
    """Trainable (requires_grad) parameters of the flow part: per top-level child, the [C, H, W]
    feature LayerNorms ("layernorm", wherever they sit), the rest ("flow").

    ``backbone_children`` name the children that hold the backbone (anomalib keeps it inside the
    model). Their parameters are left out except for feature LayerNorms; any of them that still has
    requires_grad=True is reported as "backbone_requires_grad" (it is not trained if the backbone
    runs under no_grad)."""
    from torch import nn

    def trainable(module) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    def feature_norms(module) -> list[nn.LayerNorm]:
        return [m for m in module.modules()
                if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 3 and trainable(m)]

    components, backbone_trainable = {}, 0
    for name, child in model.named_children():
        if name in backbone_children:
            norms = sum(trainable(m) for m in feature_norms(child))
            backbone_trainable += trainable(child) - norms
            components[name + " (LayerNorms only)"] = norms
        else:
            components[name] = trainable(child)
    norms = feature_norms(model)
    layernorm = sum(trainable(m) for m in norms)
    total = sum(components.values())
    return {
        "total": total,
        "layernorm": layernorm,
        "flow": total - layernorm,
        "components": {k: v for k, v in components.items() if v},
        "layernorm_shapes": [list(m.normalized_shape) for m in norms],
        "backbone_requires_grad": backbone_trainable,
        "not_trainable": sum(p.numel() for p in model.parameters() if not p.requires_grad),
    }


# --------------------------------------------------------------------------- anomalib side


def _offline_anomalib() -> list[str]:
    """Make anomalib's constructors build random-weight backbones without a download."""
    import timm
    import torchvision.models

    import anomalib.models.image.csflow.torch_model as csflow_model
    import anomalib.models.image.uflow.feature_extraction as uflow_features

    patched = []
    create_model = timm.create_model

    def create_random(*args, **kwargs):
        kwargs["pretrained"] = False
        return create_model(*args, **kwargs)

    timm.create_model = create_random  # anomalib calls timm.create_model through the module
    patched.append("timm.create_model(pretrained=...) -> pretrained=False (U-Flow extractors ask for True)")

    def efficientnet_b5(weights=None, **kwargs):
        return torchvision.models.efficientnet_b5(weights=None, **kwargs)

    csflow_model.efficientnet_b5 = efficientnet_b5
    patched.append("torchvision efficientnet_b5(IMAGENET1K_V1) -> efficientnet_b5(weights=None) (CS-Flow)")
    assert uflow_features.timm.create_model is create_random
    return patched


def build_anomalib(spec: dict[str, Any]):
    args = dict(spec)
    name = args.pop("model")
    if "input_size" in args:
        args["input_size"] = tuple(args["input_size"])
    if name == "fastflow":
        from anomalib.models.image.fastflow.torch_model import FastflowModel

        return FastflowModel(pre_trained=False, **args)
    if name == "cflow":
        from anomalib.models.image.cflow.torch_model import CflowModel

        return CflowModel(pre_trained=False, **args)
    if name == "csflow":
        from anomalib.models.image.csflow.torch_model import CsFlowModel

        return CsFlowModel(**args)
    if name == "uflow":
        from anomalib.models.image.uflow.torch_model import UflowModel

        return UflowModel(**args)
    raise ValueError(f"unknown anomalib model {name!r}")


def anomalib_flow_inputs(model) -> list[list[int]]:
    """The (C, H, W) each anomalib flow was declared with (FrEIA SequenceINN / GraphINN inputs)."""
    from FrEIA.framework import GraphINN, SequenceINN

    dims = []
    for module in model.modules():
        if isinstance(module, SequenceINN):
            dims.append(list(module.shapes[0]))
        elif isinstance(module, GraphINN):
            dims.extend(list(node.output_dims[0]) for node in module.in_nodes)
    return dims


def anomalib_side(configs: list[dict[str, Any]]) -> dict[str, Any]:
    import anomalib
    import torch

    torch.manual_seed(0)
    patched = _offline_anomalib()
    rows = {}
    for config in configs:
        start = time.perf_counter()
        model = build_anomalib(config["anomalib"])
        counts = count_parameters(model, backbone_children=("feature_extractor", "encoder"))
        counts["flow_inputs"] = anomalib_flow_inputs(model)
        counts["build_s"] = round(time.perf_counter() - start, 2)
        rows[config["key"]] = counts
        del model
    return {"side": "anomalib", "version": anomalib.__version__, "torch": torch.__version__,
            "offline_patches": patched, "rows": rows}


# --------------------------------------------------------------------------- our side


def ours_side(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """Backbone channels and feature sizes from our extractors built and run on the meta device
    (shapes only, no weights), then our flows built for them and counted."""
    import torch

    import methods  # noqa: F401  (registers the methods)
    from harness.profile import trainable_parameters
    from methods.registry import build_model, create_method

    rows = {}
    for config in configs:
        start = time.perf_counter()
        method_config = create_method(config["method"], **config["ours"])
        height, width = method_config.input_size_for("")
        with torch.device("meta"):
            extractor = method_config.feature_extractor(pretrained=False)
            features = extractor(torch.empty(1, 3, height, width))
        channels = list(extractor.channels)
        model = build_model(method_config, channels)
        counts = count_parameters(model)
        counts["flow_inputs"] = [list(f.shape[1:]) for f in features]
        counts["harness_profile"] = trainable_parameters(model)
        counts["build_s"] = round(time.perf_counter() - start, 2)
        rows[config["key"]] = counts
    return {"side": "ours", "torch": torch.__version__, "rows": rows}


# --------------------------------------------------------------------------- same weights, same outputs?
#
# Counting parameters shows the same shapes; this check shows the same function. The anomalib side
# builds a small model of each kind, perturbs every trainable tensor (so that zero-initialised
# gates and unit LayerNorms do not hide anything), and saves its flow weights in a fixed order,
# random backbone-shaped features and its outputs. Our side loads the weights in the same order
# into our model, runs the same features and compares.

OUTPUT_CONFIGS: list[dict[str, Any]] = [
    {
        "key": "fastflow_resnet18_128",
        "method": "fastflow",
        "ours": {"backbone": "resnet18", "input_size": [128, 128], "conv3x3_only": False},
        "anomalib": {"model": "fastflow", "backbone": "resnet18", "input_size": [128, 128], "flow_steps": 8,
                     "conv3x3_only": False},
        "features": [[64, 32, 32], [128, 16, 16], [256, 8, 8]],
    },
    {
        "key": "cflow_resnet18_layers2-4_128",
        "method": "cflow",
        "ours": {"backbone": "resnet18", "stages": [2, 3, 4], "permute_soft": False},
        "anomalib": {"model": "cflow", "backbone": "resnet18", "layers": ["layer2", "layer3", "layer4"],
                     "permute_soft": False},
        "features": [[128, 16, 16], [256, 8, 8], [512, 4, 4]],
    },
    {
        "key": "csflow_hidden64_256",
        "method": "csflow",
        "ours": {"input_size": [256, 256], "hidden_channels": 64},
        "anomalib": {"model": "csflow", "input_size": [256, 256], "cross_conv_hidden_channels": 64,
                     "n_coupling_blocks": 4, "clamp": 3},
        "features": [[304, 8, 8], [304, 4, 4], [304, 2, 2]],
    },
    {
        "key": "uflow_resnet18_128",
        "method": "uflow",
        "ours": {"backbone": "resnet18", "input_size": [128, 128]},
        "anomalib": {"model": "uflow", "backbone": "resnet18", "input_size": [128, 128], "flow_steps": 4},
        "features": [[64, 32, 32], [128, 16, 16], [256, 8, 8]],
    },
]


def _block_tensors(block) -> list:
    """An AllInOneBlock's tensors in a fixed order (FrEIA's block and anomalib's copy alike)."""
    return [block.global_scale, block.global_offset, block.w_perm, block.w_perm_inv, *block.subnet.parameters()]


def _anomalib_tensors(name: str, model) -> list:
    from anomalib.models.components.flow import AllInOneBlock

    if name == "fastflow":
        norms = [p for norm in model.norms for p in norm.parameters()]
        return norms + [t for flow in model.fast_flow_blocks for b in flow.module_list for t in _block_tensors(b)]
    if name == "cflow":
        return [t for decoder in model.decoders for b in decoder.module_list for t in _block_tensors(b)]
    if name == "uflow":
        norms = [p for norm in model.feature_extractor.feature_normalizations for p in norm.parameters()]
        blocks = [m for m in model.flow.module_list if isinstance(m, AllInOneBlock)]  # coarse stage first
        return norms + [t for b in blocks for t in _block_tensors(b)]
    if name == "csflow":
        from anomalib.models.image.csflow.torch_model import ParallelGlowCouplingLayer, ParallelPermute

        modules = model.graph.graph.module_list
        perms = [m for m in modules if isinstance(m, ParallelPermute)]
        couplings = [m for m in modules if isinstance(m, ParallelGlowCouplingLayer)]

        def cross(c) -> list:
            convs = [c.conv_scale0_0, c.conv_scale1_0, c.conv_scale2_0, c.conv_scale0_1, c.conv_scale1_1,
                     c.conv_scale2_1, c.up_conv10, c.up_conv21, c.down_conv01, c.down_conv12]
            return [p for conv in convs for p in conv.parameters()] + [c.gamma0, c.gamma1, c.gamma2]

        return [t for perm, coupling in zip(perms, couplings)
                for t in [*perm.perm, *cross(coupling.cross_convolution2), *cross(coupling.cross_convolution1)]]
    raise ValueError(name)


def _our_tensors(method: str, model) -> list:
    if method == "fastflow":
        norms = [p for norm in model.norms for p in norm.parameters()]
        return norms + [t for flow in model.flows for b in flow.module_list for t in _block_tensors(b)]
    if method == "cflow":
        return [t for decoder in model.decoders for b in decoder.module_list for t in _block_tensors(b)]
    if method == "uflow":
        norms = [p for norm in model.feature_norms for p in norm.parameters()]
        blocks = [b for stage in reversed(model.stages) for b in stage.module_list]  # coarse stage first
        return norms + [t for b in blocks for t in _block_tensors(b)]
    if method == "csflow":
        def cross(c) -> list:
            convs = [*c.inner, *c.outer, *c.from_coarser, *c.from_finer]
            return [p for conv in convs for p in conv.parameters()] + list(c.gammas)

        return [t for block in model.blocks
                for t in [*(p.perm for p in block.permutations), *cross(block.coupling.subnet_2),
                          *cross(block.coupling.subnet_1)]]
    raise ValueError(method)


def anomalib_outputs(configs: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    import einops
    import torch
    import torch.nn.functional as F

    _offline_anomalib()
    saved = {}
    for config in configs:
        torch.manual_seed(0)
        spec = config["anomalib"]
        name = spec["model"]
        model = build_anomalib(spec).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        features = [torch.randn(2, *shape) for shape in config["features"]]
        out: dict[str, Any] = {}
        with torch.no_grad():
            if name == "fastflow":
                from anomalib.models.image.fastflow.loss import FastflowLoss

                hidden, jacobians = [], []
                for norm, flow, x in zip(model.norms, model.fast_flow_blocks, features):
                    z, jac = flow(norm(x))
                    hidden.append(z)
                    jacobians.append(jac)
                out = {"latents": hidden, "log_jac_det": sum(jacobians), "loss": FastflowLoss()(hidden, jacobians)}
            elif name == "cflow":
                from anomalib.models.image.cflow.utils import get_logp, positional_encoding_2d

                latents, jacs, logps, loss = [], [], [], 0.0
                for decoder, x in zip(model.decoders, features):
                    b, c, h, w = x.shape
                    code = einops.repeat(positional_encoding_2d(model.condition_vector, h, w).unsqueeze(0),
                                         "b c h w-> (tile b) c h w", tile=b)
                    c_r = einops.rearrange(code, "b c h w -> (b h w) c")
                    e_r = einops.rearrange(x, "b c h w -> (b h w) c")
                    z, jac = decoder(e_r, [c_r])
                    log_prob = get_logp(c, z, jac) / c
                    latents.append(z)
                    jacs.append(jac)
                    logps.append(log_prob)
                    loss = loss + (-F.logsigmoid(log_prob)).mean()  # its training loss, on every fiber
                out = {"latents": latents, "log_jac_det_fibers": jacs, "log_p_per_dim": logps, "loss": loss}
            elif name == "csflow":
                from anomalib.models.image.csflow.loss import CsFlowLoss

                z, jac = model.graph(features)
                out = {"latents": list(z), "log_jac_det_batch_sum": jac, "loss": CsFlowLoss()(z, jac),
                       "image_scores": model._compute_anomaly_scores(z)}
            elif name == "uflow":
                from anomalib.models.image.uflow.loss import UFlowLoss

                z, ljd = model.encode(model.feature_extractor.normalize_features(features))
                out = {"latents": list(z), "log_jac_det": ljd, "loss": UFlowLoss()(z, ljd)}
        tensors = [t.detach().clone() for t in _anomalib_tensors(name, model)]
        path = folder / f"{config['key']}.pt"
        torch.save({"tensors": tensors, "features": features, "outputs": out}, path)
        saved[config["key"]] = str(path)
    return {"side": "anomalib-outputs", "files": saved}


def _relative_difference(a, b) -> float:
    import torch

    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def ours_outputs(configs: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    import torch

    import methods  # noqa: F401
    from harness.scoring import latent_mean_scores
    from methods.cflow import to_fibers
    from methods.registry import build_model, create_method

    rows = {}
    for config in configs:
        saved = torch.load(folder / f"{config['key']}.pt", weights_only=False)
        method = config["method"]
        method_config = create_method(method, **config["ours"])
        model = build_model(method_config, [shape[0] for shape in config["features"]]).eval()
        ours = _our_tensors(method, model)
        if len(ours) != len(saved["tensors"]) or any(o.shape != t.shape for o, t in zip(ours, saved["tensors"])):
            rows[config["key"]] = {"error": "the two models' tensors do not line up (structure differs)"}
            continue
        with torch.no_grad():
            for mine, theirs in zip(ours, saved["tensors"]):
                mine.copy_(theirs)
            if method == "csflow":  # permutations are index buffers: keep the inverse consistent
                for block in model.blocks:
                    for permutation in block.permutations:
                        permutation.perm_inv.copy_(torch.argsort(permutation.perm))
            out = model(saved["features"])
        theirs = saved["outputs"]
        row: dict[str, Any] = {"latents": max(_relative_difference(z, t) for z, t in
                                              zip(out.latents if method != "cflow" else
                                                  [to_fibers(z) for z in out.latents], theirs["latents"]))}
        with torch.no_grad():
            if method == "fastflow":
                row["log_jac_det"] = _relative_difference(out.log_jac_det, theirs["log_jac_det"])
                row["loss"] = _relative_difference(model.loss(out), theirs["loss"])
            elif method == "cflow":
                row["log_jac_det"] = max(_relative_difference(j.flatten(), t) for j, t in
                                         zip(out.log_jac_det_maps, theirs["log_jac_det_fibers"]))
                row["log_p_per_dim"] = max(_relative_difference(m.flatten(), t) for m, t in
                                           zip(model.log_likelihood_maps(out), theirs["log_p_per_dim"]))
                row["loss"] = _relative_difference(model.loss(out), theirs["loss"])
            elif method == "csflow":
                row["log_jac_det (batch sum)"] = _relative_difference(out.log_jac_det.sum(),
                                                                      theirs["log_jac_det_batch_sum"])
                row["image_scores"] = _relative_difference(latent_mean_scores(model.log_likelihood_maps(out)),
                                                           theirs["image_scores"])
                ours_loss, their_loss = model.loss(out), theirs["loss"]
                row["loss"] = _relative_difference(ours_loss, their_loss)
                # anomalib subtracts the batch's summed log-det from every sample (specs 5.6)
                z = torch.cat([latent.flatten(1) for latent in out.latents], dim=1)
                batch_sum_loss = torch.mean(0.5 * z.pow(2).sum(dim=1) - out.log_jac_det.sum()) / z.shape[1]
                row["loss with anomalib's batch-sum log-det"] = _relative_difference(batch_sum_loss, their_loss)
                row["note"] = ("loss: anomalib subtracts the log-det summed over the batch from every sample "
                               "(specs/baselines.md 5.6); ours follows the official per-sample loss")
            elif method == "uflow":
                row["log_jac_det"] = _relative_difference(out.log_jac_det, theirs["log_jac_det"])
                row["loss"] = _relative_difference(model.loss(out), theirs["loss"])
                model.config.loss_batch_sum_bug = True
                row["loss with loss_batch_sum_bug=true"] = _relative_difference(model.loss(out), theirs["loss"])
                model.config.loss_batch_sum_bug = False
                row["note"] = ("loss: anomalib (and the official code before 2024-01-22) sums the z^2 term over "
                               "the batch; ours follows the current official loss, loss_batch_sum_bug=true "
                               "reproduces anomalib's")
        rows[config["key"]] = row
    return {"side": "ours-outputs", "rows": rows}


# --------------------------------------------------------------------------- combine


def run_side(python: str, side: str, vit: bool, dump: Path | None = None) -> dict[str, Any]:
    command = [python, str(Path(__file__).resolve()), "--side", side] + (["--vit"] if vit else [])
    command += ["--dump", str(dump)] if dump else []
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"{side} side failed ({' '.join(command)}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _same_inputs(ours: list[list[int]], theirs: list[list[int]]) -> bool:
    """Same channels per scale, and the same map sizes where both flows declare one (anomalib's
    CFlow decoders are declared on feature vectors, ours report the maps they see)."""
    return len(ours) == len(theirs) and all(
        a[0] == b[0] and (len(a) == 1 or len(b) == 1 or a == b) for a, b in zip(ours, theirs)
    )


def reason(config: dict[str, Any], ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    parts = []
    if not _same_inputs(ours["flow_inputs"], theirs["flow_inputs"]):
        parts.append(f"flow inputs differ: ours {ours['flow_inputs']}, anomalib {theirs['flow_inputs']}")
    if ours["layernorm"] != theirs["layernorm"]:
        parts.append(f"LayerNorm {ours['layernorm']:,} vs {theirs['layernorm']:,}")
    if ours["flow"] != theirs["flow"]:
        parts.append(f"flow {ours['flow']:,} vs {theirs['flow']:,}")
    head = "same architecture, same count" if not parts else "; ".join(parts)
    if theirs["backbone_requires_grad"]:
        head += (f"; anomalib leaves requires_grad=True on {theirs['backbone_requires_grad']:,} backbone "
                 "parameters (excluded: its extractor runs under no_grad, so they are never updated)")
    note = NOTES.get(config["key"])
    return f"{head}. {note}" if note else head


def default_ours_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return os.environ.get("FLOWAD_PYTHON") or (str(venv) if venv.exists() else sys.executable)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["ours", "anomalib", "ours-outputs", "anomalib-outputs"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--dump", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--anomalib-python", default=os.environ.get("ANOMALIB_PYTHON", sys.executable),
                        help="interpreter with anomalib installed (default: $ANOMALIB_PYTHON or this one)")
    parser.add_argument("--ours-python", default=default_ours_python(),
                        help="interpreter with this project installed (default: $FLOWAD_PYTHON or .venv)")
    parser.add_argument("--vit", action="store_true", help="also FastFlow with DeiT-B/384 and CaiT-M48/448")
    parser.add_argument("--no-outputs", action="store_true",
                        help="skip the check that the same weights give the same outputs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for parity_anomalib.{json,csv}")
    args = parser.parse_args()
    configs = CONFIGS + (VIT_CONFIGS if args.vit else [])

    if args.side:
        sides = {"anomalib": lambda: anomalib_side(configs), "ours": lambda: ours_side(configs),
                 "anomalib-outputs": lambda: anomalib_outputs(OUTPUT_CONFIGS, args.dump),
                 "ours-outputs": lambda: ours_outputs(OUTPUT_CONFIGS, args.dump)}
        print(json.dumps(sides[args.side]()))
        return

    start = time.perf_counter()
    theirs = run_side(args.anomalib_python, "anomalib", args.vit)
    ours = run_side(args.ours_python, "ours", args.vit)
    rows = []
    for config in configs:
        a, o = theirs["rows"][config["key"]], ours["rows"][config["key"]]
        rows.append({
            "key": config["key"], "config": config["label"],
            "ours": o["total"], "anomalib": a["total"], "difference": o["total"] - a["total"],
            "ours_layernorm": o["layernorm"], "anomalib_layernorm": a["layernorm"],
            "ours_flow": o["flow"], "anomalib_flow": a["flow"],
            "flow_inputs": o["flow_inputs"],
            "reason": reason(config, o, a),
            "ours_settings": config["ours"], "anomalib_settings": config["anomalib"],
            "ours_components": o["components"], "anomalib_components": a["components"],
        })

    result = {
        "what": "trainable parameters (requires_grad) of the flow part; frozen backbones excluded",
        "anomalib_version": theirs["version"], "anomalib_offline_patches": theirs["offline_patches"],
        "torch": {"ours": ours["torch"], "anomalib": theirs["torch"]},
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cpus",
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    if not args.no_outputs:
        with tempfile.TemporaryDirectory() as folder:
            run_side(args.anomalib_python, "anomalib-outputs", False, Path(folder))
            result["same_weights_outputs"] = {
                "what": "max |ours - anomalib| / max |anomalib| with anomalib's (perturbed) weights loaded into "
                        "our model, on the same random features (batch 2)",
                "rows": run_side(args.ours_python, "ours-outputs", False, Path(folder))["rows"],
            }
        result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parity_anomalib.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(args.out / "parity_anomalib.csv", "w", newline="") as f:
        fields = ["key", "config", "ours", "anomalib", "difference", "ours_layernorm", "anomalib_layernorm",
                  "ours_flow", "anomalib_flow", "reason"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    print(f"anomalib {theirs['version']} vs this project: trainable parameters (frozen backbones excluded)\n")
    print("| config | ours | anomalib | difference | of which LayerNorm (ours / anomalib) | reason |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['config']} | {row['ours']:,} | {row['anomalib']:,} | {row['difference']:+,} | "
              f"{row['ours_layernorm']:,} / {row['anomalib_layernorm']:,} | {row['reason']} |")
    if "same_weights_outputs" in result:
        print("\nSame weights, same features: relative difference of ours from anomalib "
              "(float32; ~1e-6 = identical)\n")
        print("| model | quantity | relative difference |")
        print("|---|---|---:|")
        notes = []
        for key, row in result["same_weights_outputs"]["rows"].items():
            for quantity, value in row.items():
                if quantity in ("note", "error"):
                    notes.append(f"- {key}: {value}")
                else:
                    print(f"| {key} | {quantity} | {value:.1e} |")
        print("\n".join([""] + notes))
    print(f"\nwritten: {args.out / 'parity_anomalib.json'}, {args.out / 'parity_anomalib.csv'}")


if __name__ == "__main__":
    main()
