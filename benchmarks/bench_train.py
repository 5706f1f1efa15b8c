"""Training and test throughput of a method under the shared loop's three ways of getting features.

    python benchmarks/bench_train.py                       # MSFlow, resnet18 at 256 px, on cpu
    python benchmarks/bench_train.py --backbone wide_resnet50_2.tv_in1k --size 512 --device cuda

Ways of producing the flow inputs during training, each timed over one epoch of ``--images``
random images (throughput does not depend on image content):

  cached      frozen features computed once per class, then reused every epoch (our default for
              methods trained without augmentation); the one-off extraction is timed separately
  recomputed  the frozen backbone runs every step under no_grad (our loop with --feature-cache off)
  reference   the official MSFlow code's way: the backbone runs every step and autograd runs
              through it (it is in eval mode but not under no_grad, its parameters require grad)

Test throughput: the backbone plus the flows in inference, images/s. Weights are random: speed only.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from harness.train import resolve_device
from methods.registry import build_model, create_method


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="msflow")
    parser.add_argument("--backbone", default="resnet18.tv_in1k")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=32, help="images per epoch")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="autocast (float16 on cuda, bfloat16 on cpu)")
    parser.add_argument("--epochs", type=int, default=100, help="epochs used for the whole-run estimate")
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    config = create_method(args.method, backbone=args.backbone, input_size=(args.size, args.size),
                           batch_size=args.batch_size)
    extractor = config.feature_extractor(pretrained=False).to(device)
    model = build_model(config, extractor.channels).to(device)
    optimizer = config.make_optimizer(p for p in model.parameters() if p.requires_grad)
    images = torch.randn(args.images, 3, args.size, args.size, device=device)
    batches = images.split(args.batch_size)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def step(features: list[torch.Tensor]) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=args.amp):
            loss = model.loss(model(features))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

    def extract_all() -> list[list[torch.Tensor]]:
        with torch.no_grad():
            return [extractor(b) for b in batches]

    # The reference code's backbone: same weights and pooling, but autograd runs through it.
    reference_backbone, pool = extractor.backbone, extractor.pool

    def reference_features(batch: torch.Tensor) -> list[torch.Tensor]:
        for p in reference_backbone.parameters():
            p.requires_grad_(True)
        maps = reference_backbone(batch)
        return [pool(m) for m in maps]

    def best(fn) -> float:
        # Interleaved repeats, best of: robust to other load on a shared machine.
        return min(timed(device, fn) for _ in range(args.repeats))

    step(extract_all()[0])  # warm-up: kernels, allocator, autotuning
    cache = extract_all()
    extraction = best(extract_all)
    timings = {"cached": [], "recomputed": [], "reference": []}
    ways = {
        "cached": lambda: [step(f) for f in cache],
        "recomputed": lambda: [step(f) for f in extract_all()],
        "reference": lambda: [step(reference_features(b)) for b in batches],
    }
    for _ in range(args.repeats):
        for way, fn in ways.items():
            timings[way].append(timed(device, fn))
    cached, recomputed, reference = (min(timings[w]) for w in ("cached", "recomputed", "reference"))
    for p in reference_backbone.parameters():
        p.requires_grad_(False)

    model.eval()

    def test_pass() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=args.amp):
            for b in batches:
                model.log_likelihood_maps(model(extractor(b)))

    test = best(test_pass)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    n = args.images
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "method": args.method, "backbone": args.backbone, "size": args.size, "images": n,
        "batch_size": args.batch_size, "amp": args.amp,
        "train_images_per_s": {"cached": n / cached, "recomputed": n / recomputed, "reference": n / reference},
        "feature_extraction_s": extraction,
        "epoch_s": {"cached": cached, "recomputed": recomputed, "reference": reference},
        "speedup_per_epoch_cached_vs_reference": reference / cached,
        "speedup_per_epoch_recomputed_vs_reference": reference / recomputed,
        f"speedup_{args.epochs}_epochs_cached_vs_reference": (args.epochs * reference)
        / (extraction + args.epochs * cached),
        "test_images_per_s": n / test,
        "peak_gpu_memory_gib": peak,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.method} {args.backbone} {args.size}px, {n} images, batch {args.batch_size}, "
          f"device {result['device']}, amp {args.amp}")
    print(f"{'features':<12}{'epoch s':>10}{'train img/s':>14}{'vs reference':>14}")
    for way in ("cached", "recomputed", "reference"):
        seconds = result["epoch_s"][way]
        print(f"{way:<12}{seconds:>10.2f}{n / seconds:>14.1f}{reference / seconds:>13.2f}x")
    print(f"one-off feature extraction: {extraction:.2f} s; over {args.epochs} epochs the cache is "
          f"{result[f'speedup_{args.epochs}_epochs_cached_vs_reference']:.2f}x faster than the reference way")
    print(f"test: {result['test_images_per_s']:.1f} images/s" +
          (f"; peak GPU memory {peak:.1f} GiB" if peak is not None else ""))


if __name__ == "__main__":
    main()
