"""MSFlow at paper settings on one GPU: what one class costs under each precision and compilation.

    python benchmarks/bench_gpu.py                 # GPU: WRN-50 stages 1-3, 512 px, batch 8, 209 images
    python benchmarks/bench_gpu.py --mode cpu      # the same measurements at toy size (~2 min, 2 cores)

The CPU mode leaves torch.compile out (inductor's code generation alone takes minutes on two
cores; ``--with-compile`` puts it back); tf32 is CUDA-only and left out there as well.

Measured, in one run (within about 8 minutes on one H100-class GPU):

  - seconds per training epoch with cached features (the loop's default for MSFlow) in fp32, tf32
    and bf16, each eager and under torch.compile, and the projected cost of one class: 100 epochs,
    feature extraction of the train and test sets once, and 25 evaluations;
  - test throughput (backbone and flows, images/s) and peak GPU memory of each setting;
  - as ratios to the cached way in fp32: the reference code's way (backbone recomputed every step
    with autograd running through it) and anomalib's way (backbone recomputed under no_grad);
  - throughput with K = 1, 2, 4 training runs sharing the GPU (one process each, timed together).

Inputs are random tensors of the image size and the backbone has random weights: throughput does
not depend on either. 209 training images and 83 test images are MVTec AD bottle's counts.
Writes benchmarks/results/bench_gpu_<mode>.json and .md (a table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_train import timed  # the device-synchronised timer of the training benchmark
from harness.precision import prepare_model
from methods.registry import build_model, create_method

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {
    "gpu": dict(device="cuda", backbone="wide_resnet50_2.tv_in1k", size=512, train_images=209, test_images=83,
                precisions=["fp32", "tf32", "bf16"], runs_per_gpu=[1, 2, 4], compiles=[False, True]),
    "cpu": dict(device="cpu", backbone="resnet18.tv_in1k", size=128, train_images=24, test_images=16,
                precisions=["fp32", "bf16"], runs_per_gpu=[1, 2], compiles=[False]),
}
EPOCHS, EVALUATIONS = 100, 25  # MSFlow: 25 meta-epochs of 4 epochs, an evaluation after each


class Bench:
    """One MSFlow model with its extractor, optimiser and random inputs on one device."""

    def __init__(self, args, precision: str, compile: bool, channels_last: bool = False):
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        self.config = create_method("msflow", backbone=args.backbone, input_size=(args.size, args.size),
                                    batch_size=args.batch_size)
        self.extractor = self.config.feature_extractor(pretrained=False).to(self.device)
        self.model = build_model(self.config, self.extractor.channels).to(self.device)
        prepare_model(self.model, self.device, precision, compile=compile, channels_last=channels_last)
        self.optimizer = self.config.make_optimizer(self.model.parameters())
        self.channels_last = channels_last
        generator = torch.Generator(device=self.device).manual_seed(0)
        self.train = torch.randn(args.train_images, 3, args.size, args.size, device=self.device,
                                 generator=generator).split(args.batch_size)
        self.test = torch.randn(args.test_images, 3, args.size, args.size, device=self.device,
                                generator=generator).split(args.batch_size)
        self.cache: list[list[torch.Tensor]] = []

    def _layout(self, features):
        if self.channels_last:
            return [f.contiguous(memory_format=torch.channels_last) for f in features]
        return features

    def step(self, features: list[torch.Tensor]) -> None:
        loss = self.model.loss(self.model(self._layout(features)))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()

    @torch.no_grad()
    def extract(self, images) -> list[list[torch.Tensor]]:
        return [self.extractor(b) for b in images]

    def epoch_cached(self) -> None:
        for features in self.cache:
            self.step(features)

    def epoch_recomputed(self) -> None:  # anomalib's way: the backbone under no_grad every step
        for batch in self.train:
            with torch.no_grad():
                features = self.extractor(batch)
            self.step(features)

    def epoch_reference(self) -> None:  # the reference code's way: autograd through the backbone
        backbone, pool = self.extractor.backbone, self.extractor.pool
        for p in backbone.parameters():
            p.requires_grad_(True)
        try:
            for batch in self.train:
                self.step([pool(m) for m in backbone(batch)])
        finally:
            for p in backbone.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def test_pass(self) -> None:
        self.model.eval()
        for batch in self.test:
            self.model.log_likelihood_maps(self.model(self._layout(self.extractor(batch))))
        self.model.train()


def best_of(device, fn, repeats: int) -> float:
    return min(timed(device, fn) for _ in range(repeats))


def measure_setting(args, precision: str, compile: bool) -> dict:
    bench = Bench(args, precision, compile)
    device = bench.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    extraction = timed(device, lambda: bench.cache.extend(bench.extract(bench.train)))
    test_extraction = timed(device, lambda: bench.extract(bench.test))
    warm_up = timed(device, bench.epoch_cached)  # compiles, autotunes, fills the allocator
    bench.test_pass()
    epoch = best_of(device, bench.epoch_cached, args.repeats)
    test = best_of(device, bench.test_pass, args.repeats)
    row = {
        "precision": precision, "compile": compile, "epoch_s": epoch, "first_epoch_s": warm_up,
        "train_images_per_s": args.train_images / epoch, "test_images_per_s": args.test_images / test,
        "feature_extraction_s": extraction + test_extraction,
        # 100 epochs + the one-off extraction + 25 evaluations (+ the first, compiling epoch)
        "projected_class_s": (EPOCHS - 1) * epoch + warm_up + extraction + test_extraction
        + EVALUATIONS * test,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if precision == "fp32" and not compile:
        recomputed = best_of(device, bench.epoch_recomputed, args.repeats)
        reference = best_of(device, bench.epoch_reference, args.repeats)
        row["ways_epoch_s"] = {"cached": epoch, "anomalib_no_grad_backbone": recomputed,
                               "reference_autograd_backbone": reference}
    del bench
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------- K runs per GPU


def worker(args) -> None:
    """One of K concurrent runs: set up and warm up, say ready, wait for the start, time epochs."""
    bench = Bench(args, args.precision, args.worker_compile)
    bench.cache = bench.extract(bench.train)
    bench.epoch_cached()
    Path(args.ready).touch()
    while not Path(args.go).exists():
        time.sleep(0.01)
    seconds = timed(bench.device, lambda: [bench.epoch_cached() for _ in range(args.worker_epochs)])
    print(json.dumps({"seconds": seconds, "images": args.worker_epochs * args.train_images}))


def measure_packing(args, k: int, precision: str, compile: bool) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    go = folder / "go"
    procs = []
    for i in range(k):
        command = [sys.executable, __file__, "--worker", "--mode", args.mode, "--precision", precision,
                   "--ready", str(folder / f"ready{i}"), "--go", str(go),
                   "--worker-epochs", str(args.worker_epochs), "--device", args.device,
                   "--backbone", args.backbone, "--size", str(args.size), "--batch-size", str(args.batch_size),
                   "--train-images", str(args.train_images), "--test-images", "1"]
        if compile:
            command.append("--worker-compile")
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
    while not all((folder / f"ready{i}").exists() for i in range(k)):
        if any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError(f"a benchmark worker failed (K={k}); run it alone to see why")
        time.sleep(0.05)
    go.touch()
    answers = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"a benchmark worker failed (K={k}, exit {p.returncode})")
        answers.append(json.loads(out.strip().splitlines()[-1]))
    seconds = max(a["seconds"] for a in answers)
    return {"runs": k, "precision": precision, "compile": compile,
            "train_images_per_s": sum(a["images"] for a in answers) / seconds,
            "per_run_images_per_s": [a["images"] / a["seconds"] for a in answers]}


# --------------------------------------------------------------------------- report


def table(result: dict) -> str:
    s = result["settings"]
    lines = [f"MSFlow, {s['backbone']} stages 1-3, {s['size']} px, batch {s['batch_size']}, "
             f"{s['train_images']} training / {s['test_images']} test images, random weights; "
             f"device: {result['device']}; torch {result['torch']}.", "",
             "| precision | compile | epoch (s) | train img/s | test img/s | one class, 100 epochs + 25 evals (s) | peak GiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["settings_rows"]:
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"| {r['precision']} | {'yes' if r['compile'] else 'no'} | {r['epoch_s']:.3f} | "
                     f"{r['train_images_per_s']:.1f} | {r['test_images_per_s']:.1f} | "
                     f"{r['projected_class_s']:.0f} | {peak} |")
    ways = result["ways_fp32_epoch_s"]
    lines += ["", "Ways of getting the features (fp32, eager), epoch time relative to cached features:", "",
              "| way | epoch (s) | x cached |", "|---|---:|---:|"]
    for name, seconds in ways.items():
        lines.append(f"| {name} | {seconds:.3f} | {seconds / ways['cached']:.2f} |")
    lines += ["", "Training runs sharing the device (cached features):", "",
              "| runs | precision | compile | total train img/s | x one run |", "|---:|---|---|---:|---:|"]
    one = result["packing"][0]["train_images_per_s"]
    for p in result["packing"]:
        lines.append(f"| {p['runs']} | {p['precision']} | {'yes' if p['compile'] else 'no'} | "
                     f"{p['train_images_per_s']:.1f} | {p['train_images_per_s'] / one:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="gpu")
    parser.add_argument("--device", default=None)
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-images", type=int, default=None)
    parser.add_argument("--test-images", type=int, default=None)
    parser.add_argument("--precisions", nargs="+", default=None)
    compile_rows = parser.add_mutually_exclusive_group()
    compile_rows.add_argument("--no-compile", dest="compiles", action="store_const", const=[False],
                              help="leave out the torch.compile settings")
    compile_rows.add_argument("--with-compile", dest="compiles", action="store_const", const=[False, True],
                              help="measure each precision eager and compiled")
    parser.add_argument("--runs-per-gpu", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=2, help="timings are the best of this many")
    parser.add_argument("--worker-epochs", type=int, default=3, help="epochs each of K concurrent runs times")
    parser.add_argument("--out", type=Path, default=RESULTS)
    # one of K concurrent runs (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--worker-compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ready", help=argparse.SUPPRESS)
    parser.add_argument("--go", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in MODES[args.mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.worker:
        return worker(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device is visible; run it on a GPU machine, or use --mode cpu")

    start = time.perf_counter()
    rows = []
    for precision in args.precisions:
        for compile in args.compiles:
            rows.append(measure_setting(args, precision, compile))
            print(f"{precision:>5} compile={compile!s:<5} epoch {rows[-1]['epoch_s']:.3f} s, "
                  f"test {rows[-1]['test_images_per_s']:.1f} img/s", flush=True)
    fastest = min(rows, key=lambda r: r["epoch_s"])
    packing = [measure_packing(args, k, fastest["precision"], fastest["compile"]) for k in args.runs_per_gpu]
    device = torch.device(args.device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "settings": {k: getattr(args, k) for k in ("mode", "backbone", "size", "batch_size", "train_images",
                                                   "test_images", "repeats", "worker_epochs")},
        "settings_rows": rows,
        "ways_fp32_epoch_s": next(r["ways_epoch_s"] for r in rows if "ways_epoch_s" in r),
        "packing": packing,
        "fastest": {"precision": fastest["precision"], "compile": fastest["compile"],
                    "projected_class_s": fastest["projected_class_s"]},
        "benchmark_wall_s": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_gpu_{args.mode}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"bench_gpu_{args.mode}.md").write_text(table(result))
    print(table(result))
    print(f"wrote {args.out / f'bench_gpu_{args.mode}.json'} and .md ({result['benchmark_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
