"""Training and test throughput of our baselines beside anomalib's implementations.

    /path/to/anomalib-venv/bin/python benchmarks/bench_vs_anomalib.py             # CPU, small workload
    python benchmarks/bench_vs_anomalib.py --anomalib-python /path/to/anomalib-venv/bin/python \\
        --device cuda --images 64 --batch-size 16 --backbone wide_resnet50_2

Same images, input size, batch size, backbone architecture (random weights: speed only) and
hardware on both sides. anomalib is not a dependency of this project: each side runs in its own
interpreter (a subprocess per side), builds its model once, then times what the orchestrator asks
for, one action at a time, and answers with JSON.

One training step = forward + loss + backward + optimiser step of the flow part, backbone frozen.

  ours, cached       our loop's default: the frozen features of the whole training set are computed
                     once (timed separately as "extraction"), then every step reads them
  ours, recomputed   the backbone runs at every step under no_grad (our loop with augmentation or
                     --feature-cache off)
  anomalib           its torch model's forward in training mode (backbone every step, then flows),
                     its loss module (anomalib.models.image.<m>.loss; CFlow: its Lightning
                     training_step, which holds the fiber-batch loop), Adam with the settings of
                     its configure_optimizers, gradient clipping where its trainer_arguments ask
  test               eval mode, no_grad: backbone + flows + anomaly maps at input size and image
                     scores (ours: harness.scoring on the batch; anomalib: its forward in eval mode)

Each side warms up with one batch. Then every way is timed ``--repeats`` times over one epoch of
``--images`` images, the two sides taking turns (one computes while the other waits; the side that
goes first alternates), so that a change of load on a shared machine hits both alike; the fastest
epoch of each way is kept.

Settings made equal on purpose (documented per method in SETTINGS_NOTES): CFlow fiber batch,
permute_soft=False, zero padding and no rotation augmentation on our side; FastFlow
conv3x3_only=False; CS-Flow EfficientNet-B5 (timm's efficientnet_b5 on our side, the same
architecture as anomalib's torchvision efficientnet_b5, which is the only backbone it accepts).

Results: a table on stdout and benchmarks/results/bench_vs_anomalib.{json,csv}.
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
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
METHODS = ("fastflow", "cflow", "csflow", "uflow")

SETTINGS_NOTES = {
    "fastflow": "stages 1-3 + [C,H,W] LayerNorm, 8 steps, conv3x3_only=False (anomalib 2.x default) on both sides",
    "cflow": "layer2-4, 8 blocks, cond 128, permute_soft=False, same fiber batch on both sides; ours with zero "
             "padding and no rotation (as anomalib) so features can be cached; torch18_zero_grad off (torch 2's "
             "zero_grad: Adam steps only the decoder being trained, as anomalib's); anomalib keeps the last "
             "partial fiber batch, ours drops it (none with these sizes)",
    "csflow": "EfficientNet-B5 stage of 304 channels at 3 scales, 4 blocks, hidden 1024, grad clip 1 on both sides; "
              "ours timm efficientnet_b5, anomalib torchvision efficientnet_b5 (same architecture)",
    "uflow": "ResNet stages 1-3 + [C,H,W] LayerNorm (or MS-CaiT), 4 steps per stage, on both sides",
}


def method_settings(method: str, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(our config overrides, anomalib torch-model spec) for one method and the workload."""
    size, batch, backbone = [args.size, args.size], args.batch_size, args.backbone
    if method == "fastflow":
        return (
            {"backbone": backbone, "input_size": size, "conv3x3_only": False, "batch_size": batch},
            {"model": "fastflow", "backbone": backbone, "input_size": size, "flow_steps": 8, "conv3x3_only": False},
        )
    if method == "cflow":
        return (
            {"backbone": backbone, "stages": [2, 3, 4], "input_size": size, "padding_mode": "zeros",
             "rotation_degrees": 0.0, "permute_soft": False, "fiber_batch_size": args.fiber_batch_size,
             "batch_size": batch, "torch18_zero_grad": False},
            {"model": "cflow", "backbone": backbone, "layers": ["layer2", "layer3", "layer4"],
             "fiber_batch_size": args.fiber_batch_size, "permute_soft": False},
        )
    if method == "csflow":
        return (
            {"backbone": "efficientnet_b5", "input_size": size, "batch_size": batch},
            {"model": "csflow", "input_size": size, "cross_conv_hidden_channels": 1024, "n_coupling_blocks": 4,
             "clamp": 3},
        )
    if method == "uflow":
        uflow_backbone = args.uflow_backbone or backbone
        if uflow_backbone == "mcait":
            return (
                {"input_size": [448, 448], "batch_size": batch},
                {"model": "uflow", "backbone": "mcait", "input_size": [448, 448], "flow_steps": 4},
            )
        return (
            {"backbone": uflow_backbone, "input_size": size, "batch_size": batch},
            {"model": "uflow", "backbone": uflow_backbone, "input_size": size, "flow_steps": 4},
        )
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


# --------------------------------------------------------------------------- timing helpers


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def load_images(spec: dict[str, Any], device):
    """The benchmark images [N, 3, H, W]: a saved tensor, or standard-normal noise from seed 0
    (identical on both sides with the same torch version)."""
    import torch

    if spec.get("images_file"):
        images = torch.load(spec["images_file"])
    else:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(spec["images"], 3, *spec["size"], generator=generator)
    return images.to(device)


def set_threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- our side


def ours_side(spec: dict[str, Any]):
    """(device, timed actions, info) of our side: the loop's ways of training, and testing."""
    import torch

    import methods  # noqa: F401  (registers the methods)
    from harness.scoring import score
    from harness.train import resolve_device
    from methods.registry import build_model, create_method

    set_threads(spec["threads"])
    device = resolve_device(spec["device"])
    torch.manual_seed(0)
    config = create_method(spec["method"], **spec["ours"])
    extractor = config.feature_extractor(pretrained=False).to(device)
    model = build_model(config, extractor.channels).to(device)
    optimizer = config.make_optimizer(p for p in model.parameters() if p.requires_grad)
    size = tuple(config.input_size_for(""))
    images = load_images(dict(spec, size=list(size)), device)
    batches = images.split(spec["batch_size"])

    def train_batch(features: list[torch.Tensor]) -> None:
        """What harness.train.Trainer does with one batch of features (fp32)."""
        if hasattr(model, "training_losses"):
            losses = model.training_losses(features)
        else:
            losses = [model.loss(model(features))]
        for loss in losses:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            loss.item()

    def extract_all() -> list[list[torch.Tensor]]:
        with torch.no_grad():
            return [extractor(b) for b in batches]

    def test_pass() -> None:
        with torch.no_grad():
            for b in batches:
                maps = model.log_likelihood_maps(model(extractor(b)))
                score(maps, size, config.scoring())

    cache: list[list[torch.Tensor]] = []

    def extraction() -> None:
        cache[:] = extract_all()

    def train_cached() -> None:
        model.train()
        for features in cache:
            train_batch(features)

    def train_recomputed() -> None:
        model.train()
        for b in batches:
            train_batch(extractor(b))

    def test() -> None:
        model.eval()
        test_pass()

    info = {
        "side": "ours", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "input_size": list(size), "images": len(images),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    actions = {"extraction": extraction, "train_cached": train_cached, "train_recomputed": train_recomputed,
               "test": test}
    extraction()  # warm-up: kernels, allocator
    train_batch(cache[0])
    test()
    return device, actions, info


# --------------------------------------------------------------------------- anomalib side


def anomalib_training(spec: dict[str, Any], device):
    """(model, train_batch(images)) the way anomalib's Lightning module trains."""
    import torch

    from parity_anomalib import build_anomalib

    name = spec["anomalib"]["model"]
    if name == "cflow":
        from anomalib.models.image.cflow.lightning_model import Cflow

        args = {k: v for k, v in spec["anomalib"].items() if k != "model"}
        module = Cflow(pre_trained=False, pre_processor=False, post_processor=False, evaluator=False,
                       visualizer=False, **args).to(device)
        optimizer = module.configure_optimizers()  # Adam(decoders, lr=1e-4)
        # Outside a Lightning Trainer: hand training_step its optimiser, backward and a silent log.
        module.optimizers = lambda *a, **k: optimizer
        module.manual_backward = lambda loss, *a, **k: loss.backward()
        module.log = lambda *a, **k: None

        def train_batch(images):
            module.training_step(types.SimpleNamespace(image=images))

        return module.model, train_batch

    model = build_anomalib(spec["anomalib"]).to(device)
    if name == "fastflow":
        from anomalib.models.image.fastflow.loss import FastflowLoss

        loss_fn, clip = FastflowLoss(), 0.0
        optimizer = torch.optim.Adam(model.parameters(), lr=0.001, weight_decay=0.00001)
    elif name == "csflow":
        from anomalib.models.image.csflow.loss import CsFlowLoss

        loss_fn, clip = CsFlowLoss(), 1.0  # trainer_arguments: gradient_clip_val=1
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, eps=1e-04, weight_decay=1e-5, betas=(0.5, 0.9))
    elif name == "uflow":
        from anomalib.models.image.uflow.loss import UFlowLoss

        loss_fn, clip = UFlowLoss(), 0.0
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    else:
        raise ValueError(name)

    def train_batch(images):
        outputs = model(images)
        loss = loss_fn(*outputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
        optimizer.step()
        loss.item()  # its training_step logs loss.item()

    return model, train_batch


def anomalib_side(spec: dict[str, Any]):
    """(device, timed actions, info) of anomalib's side."""
    import anomalib
    import torch

    from parity_anomalib import _offline_anomalib

    set_threads(spec["threads"])
    device = torch.device("cuda" if spec["device"] == "auto" and torch.cuda.is_available() else
                          ("cpu" if spec["device"] == "auto" else spec["device"]))
    torch.manual_seed(0)
    _offline_anomalib()
    model, train_batch = anomalib_training(spec, device)
    size = spec["anomalib"].get("input_size") or spec["ours"].get("input_size")
    images = load_images(dict(spec, size=list(size)), device)
    batches = images.split(spec["batch_size"])

    def train() -> None:
        model.train()
        for b in batches:
            train_batch(b)

    def test() -> None:
        model.eval()
        with torch.no_grad():
            for b in batches:
                model(b)

    model.train()
    train_batch(batches[0])  # warm-up
    test()
    info = {
        "side": "anomalib", "version": anomalib.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "input_size": list(size), "images": len(images),
    }
    return device, {"train": train, "test": test}, info


# --------------------------------------------------------------------------- embedded images


def write_embedded_images(spec: dict[str, Any]) -> None:
    """Training images of one class of the embedded dataset, resized and normalised by our
    data reader, repeated up to the requested count, saved as one tensor."""
    import torch

    from harness.data import AnomalyDataset
    from harness.synthetic import generate_embedded

    with tempfile.TemporaryDirectory() as folder:
        root = generate_embedded(Path(folder) / "embedded", seed=0, classes=[spec["class_name"]])
        dataset = AnomalyDataset(root, spec["class_name"], "train", tuple(spec["size"]))
        images = [dataset[i % len(dataset)]["image"] for i in range(spec["images"])]
    torch.save(torch.stack(images), spec["images_file"])


# --------------------------------------------------------------------------- orchestration


PROTOCOL = "@@"  # prefix of the lines a side answers with (libraries may print other lines)


def serve(device, actions: dict[str, Any], info: dict[str, Any]) -> None:
    """Answer the orchestrator: one action name per stdin line -> its time in seconds."""
    print(PROTOCOL + json.dumps(info), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name == "quit":
            return
        print(PROTOCOL + json.dumps({"seconds": timed(device, actions[name])}), flush=True)


class Side:
    """A side running in its own interpreter, waiting for the next action to time."""

    def __init__(self, python: str, side: str, spec: dict[str, Any], log_folder: Path):
        self.name = side
        command = [python, str(Path(__file__).resolve()), "--side", side, "--spec", json.dumps(spec)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]))
        self.log = open(log_folder / f"{spec['method']}_{side}.log", "w+")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        text=True, env=env, cwd=REPO)
        self.info = self._answer()

    def _answer(self) -> dict[str, Any]:
        for line in self.process.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        self.log.seek(0)
        sys.exit(f"{self.name} side stopped:\n{self.log.read()[-4000:]}")

    def time(self, action: str) -> float:
        self.process.stdin.write(action + "\n")
        self.process.stdin.flush()
        return self._answer()["seconds"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait()
        self.log.close()


def run_once(python: str, side: str, spec: dict[str, Any]) -> None:
    command = [python, str(Path(__file__).resolve()), "--side", side, "--spec", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"{side} failed:\n{done.stderr[-4000:]}")


def interleaved_times(ours: Side, theirs: Side, repeats: int) -> tuple[dict[str, list], dict[str, list]]:
    """Time every action ``repeats`` times, the two sides taking turns (one computes while the
    other waits), alternating which side goes first, so that load changes hit both alike."""
    ours_times: dict[str, list] = {k: [] for k in ("extraction", "train_cached", "train_recomputed", "test")}
    their_times: dict[str, list] = {"train": [], "test": []}
    for repeat in range(repeats):
        ours_times["extraction"].append(ours.time("extraction"))
        pairs = [(("train_cached", "train_recomputed"), "train"), (("test",), "test")]
        for our_actions, their_action in pairs:
            turns = [(ours, a) for a in our_actions] + [(theirs, their_action)]
            if repeat % 2:
                turns.reverse()
            for side, action in turns:
                (ours_times if side is ours else their_times)[action].append(side.time(action))
    return ours_times, their_times


def best(values: list[float]) -> float:
    return min(values)


def default_ours_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return os.environ.get("FLOWAD_PYTHON") or (str(venv) if venv.exists() else sys.executable)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["ours", "anomalib", "data"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--backbone", default="resnet18", help="resnet18 or wide_resnet50_2 (CS-Flow: always B5)")
    parser.add_argument("--uflow-backbone", default=None, help="U-Flow: resnet18, wide_resnet50_2 or mcait "
                        "(448 px); default: --backbone")
    parser.add_argument("--size", type=int, default=256, help="input size (CS-Flow: a multiple of 128)")
    parser.add_argument("--images", type=int, default=16, help="images per epoch")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fiber-batch-size", type=int, default=256, help="CFlow fiber batch, both sides "
                        "(official 256, anomalib's default 64)")
    parser.add_argument("--data", choices=["random", "embedded"], default="random",
                        help="random normal images, or training images of the embedded dataset")
    parser.add_argument("--class-name", default="granite", help="embedded class (with --data embedded)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads on both sides (default 1: with several threads, a CPU shared "
                             "with other work gives erratic times; 0: torch's default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per way (interleaved); best kept")
    parser.add_argument("--anomalib-python", default=os.environ.get("ANOMALIB_PYTHON", sys.executable),
                        help="interpreter with anomalib installed (default: $ANOMALIB_PYTHON or this one)")
    parser.add_argument("--ours-python", default=default_ours_python(),
                        help="interpreter with this project installed (default: $FLOWAD_PYTHON or .venv)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for bench_vs_anomalib.{json,csv}")
    args = parser.parse_args()

    if args.side:
        spec = json.loads(args.spec)
        if args.side == "data":
            write_embedded_images(spec)
            return
        serve(*(ours_side(spec) if args.side == "ours" else anomalib_side(spec)))
        return

    started = time.perf_counter()
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for method in args.methods:
            ours_overrides, anomalib_spec = method_settings(method, args)
            size = anomalib_spec.get("input_size") or ours_overrides["input_size"]
            spec = {"method": method, "ours": ours_overrides, "anomalib": anomalib_spec, "images": args.images,
                    "batch_size": args.batch_size, "device": args.device, "threads": args.threads,
                    "images_file": None}
            if args.data == "embedded":
                spec["images_file"] = str(Path(folder) / f"images_{size[0]}x{size[1]}.pt")
                if not Path(spec["images_file"]).exists():
                    run_once(args.ours_python, "data", dict(spec, size=size, class_name=args.class_name))
            print(f"{method}: building both sides ...", file=sys.stderr)
            ours = Side(args.ours_python, "ours", spec, Path(folder))
            theirs = Side(args.anomalib_python, "anomalib", spec, Path(folder))
            try:
                print(f"{method}: timing {args.repeats} interleaved repeats ...", file=sys.stderr)
                times_ours, times_anomalib = interleaved_times(ours, theirs, args.repeats)
            finally:
                ours.close()
                theirs.close()
            seconds_ours = {k: best(v) for k, v in times_ours.items()}
            seconds_anomalib = {k: best(v) for k, v in times_anomalib.items()}
            n = args.images
            row = {
                "method": method, "backbone": (anomalib_spec.get("backbone") or "efficientnet_b5"),
                "input_size": size, "images": n, "batch_size": args.batch_size,
                "train_ips_ours_cached": n / seconds_ours["train_cached"],
                "train_ips_ours_recomputed": n / seconds_ours["train_recomputed"],
                "train_ips_anomalib": n / seconds_anomalib["train"],
                "extraction_s": seconds_ours["extraction"],
                "test_ips_ours": n / seconds_ours["test"],
                "test_ips_anomalib": n / seconds_anomalib["test"],
                "settings": SETTINGS_NOTES[method],
            }
            row["train_ratio_cached"] = row["train_ips_ours_cached"] / row["train_ips_anomalib"]
            row["train_ratio_recomputed"] = row["train_ips_ours_recomputed"] / row["train_ips_anomalib"]
            row["test_ratio"] = row["test_ips_ours"] / row["test_ips_anomalib"]
            rows.append(row)
            raw[method] = {"spec": spec, "ours": dict(ours.info, seconds=times_ours),
                           "anomalib": dict(theirs.info, seconds=times_anomalib)}

    device = next(iter(raw.values()))["ours"]["device"]
    result = {
        "what": "images/s, best epoch of each side; ratio = ours / anomalib (> 1: ours faster)",
        "command": " ".join(["python benchmarks/bench_vs_anomalib.py", *sys.argv[1:]]),
        "device": device, "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cpus",
        "threads": next(iter(raw.values()))["ours"]["threads"],
        "data": args.data, "weights": "random", "seconds": round(time.perf_counter() - started, 1),
        "anomalib_version": next(iter(raw.values()))["anomalib"]["version"],
        "rows": rows, "raw": raw,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_vs_anomalib.json").write_text(json.dumps(result, indent=2) + "\n")
    fields = ["method", "backbone", "input_size", "images", "batch_size", "train_ips_ours_cached",
              "train_ips_ours_recomputed", "train_ips_anomalib", "train_ratio_cached", "train_ratio_recomputed",
              "extraction_s", "test_ips_ours", "test_ips_anomalib", "test_ratio", "settings"]
    with open(args.out / "bench_vs_anomalib.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})

    print(f"device {device}, {result['threads']} threads, {args.data} images, random weights, "
          f"{args.images} images, batch {args.batch_size}; images/s (best epoch); ratio = ours / anomalib\n")
    print("| method | backbone @ size | train ours cached | train ours recomputed | train anomalib | "
          "ratio cached | ratio recomputed | one-off extraction s | test ours | test anomalib | test ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['backbone']} @ {r['input_size'][0]} | {r['train_ips_ours_cached']:.2f} | "
              f"{r['train_ips_ours_recomputed']:.2f} | {r['train_ips_anomalib']:.2f} | "
              f"{r['train_ratio_cached']:.2f}x | {r['train_ratio_recomputed']:.2f}x | {r['extraction_s']:.2f} | "
              f"{r['test_ips_ours']:.2f} | {r['test_ips_anomalib']:.2f} | {r['test_ratio']:.2f}x |")
    print(f"\nwritten: {args.out / 'bench_vs_anomalib.json'}, {args.out / 'bench_vs_anomalib.csv'}")


if __name__ == "__main__":
    main()
