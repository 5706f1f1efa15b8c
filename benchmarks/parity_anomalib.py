"""Trainable parameters of our baselines beside anomalib's implementations of the same models.

    /path/to/anomalib-venv/bin/python benchmarks/parity_anomalib.py          # every configuration
    python benchmarks/parity_anomalib.py --anomalib-python /path/to/anomalib-venv/bin/python --vit

anomalib is not a dependency of this project: it lives in its own environment. The script runs
each side in its own interpreter (a subprocess per side, printing JSON) and combines them:

  anomalib side   builds anomalib's torch models (anomalib.models.image.<m>.torch_model) with
                  random backbone weights and counts the parameters with requires_grad
  our side        builds our models (methods.registry.build_model) for the same backbone
                  channels and feature sizes and counts them the same way

Only trainable parameters are counted: the frozen backbones are excluded on both sides, and so are
the fixed permutation matrices of FrEIA's AllInOneBlock (parameters with requires_grad=False).
The trainable LayerNorms over a whole [C, H, W] feature map (FastFlow and U-Flow with ResNets) are
counted on both sides and also listed on their own ("layernorm"), because their size follows the
input size.

Offline: anomalib's CS-Flow and U-Flow constructors always ask for pretrained backbone weights
(torchvision's EfficientNet-B5 IMAGENET1K_V1; timm's cait_m48_448 / cait_s24_224 / ResNets). The
anomalib side replaces those calls with random-weight constructors of the same architectures
(only the weights differ, the parameter counts do not). cait_m48_448 (356 M parameters) is built
once, with random weights (about 12 s and 2 GB on a CPU).

Results: a table on stdout and benchmarks/results/parity_anomalib.{json,csv}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
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
    "uflow_wide_resnet50_2_256": "as resnet18; the [C, H, W] LayerNorms are most of the trainable parameters",
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
    import FrEIA  # noqa: F401

    return {"side": "ours", "torch": torch.__version__, "rows": rows}


# --------------------------------------------------------------------------- combine


def run_side(python: str, side: str, vit: bool) -> dict[str, Any]:
    command = [python, str(Path(__file__).resolve()), "--side", side] + (["--vit"] if vit else [])
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
    parser.add_argument("--side", choices=["ours", "anomalib"], help=argparse.SUPPRESS)
    parser.add_argument("--anomalib-python", default=os.environ.get("ANOMALIB_PYTHON", sys.executable),
                        help="interpreter with anomalib installed (default: $ANOMALIB_PYTHON or this one)")
    parser.add_argument("--ours-python", default=default_ours_python(),
                        help="interpreter with this project installed (default: $FLOWAD_PYTHON or .venv)")
    parser.add_argument("--vit", action="store_true", help="also FastFlow with DeiT-B/384 and CaiT-M48/448")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for parity_anomalib.{json,csv}")
    args = parser.parse_args()
    configs = CONFIGS + (VIT_CONFIGS if args.vit else [])

    if args.side:
        result = anomalib_side(configs) if args.side == "anomalib" else ours_side(configs)
        print(json.dumps(result))
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
    print(f"\nwritten: {args.out / 'parity_anomalib.json'}, {args.out / 'parity_anomalib.csv'}")


if __name__ == "__main__":
    main()
