"""Feature extraction of one class with and without the decoded-image cache, on real-size images.

    python benchmarks/bench_image_cache.py --mtd /path/to/Magnetic-tile-defect-datasets.   # MTD at 192 px
    python benchmarks/bench_image_cache.py --embedded 1024 --size 512                       # MVTec-like PNGs

Feature extraction = reading the class's train and test images (decode, resize, normalise) and
running the frozen backbone on them. The cache removes the decode and resize, so both are timed:

  decode      iterating the train and test sets as the loop's DataLoader does (workers=0)
  backbone    the frozen backbone on the decoded batches (``--backbone``, random weights)
  extraction  decode + backbone, without the cache, with it (file present), and the first
              run that builds the cache (decoding on threads, then writing it)

MTD is converted from the upstream layout (harness.fetch.convert_mtd, DifferNet's split) into a
temporary folder; ``--embedded N`` generates the embedded classes' images at N px instead (PNG,
like MVTec AD's 700-1024 px images). Writes benchmarks/results/bench_image_cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from harness.data import AnomalyDataset, dataset_hash
from harness.features import FeatureExtractor

RESULTS = Path(__file__).resolve().parent / "results"


def prepare(args, folder: Path) -> tuple[Path, str]:
    if args.mtd:
        from harness.fetch import convert_mtd

        train_list = Path(args.mtd) / "mtd_train_filenames.txt"
        convert_mtd(args.mtd, folder / "mtd", train_list)
        return folder / "mtd", "magnetic_tile"
    from harness.synthetic import generate_embedded

    generate_embedded(folder / "embedded", seed=0, image_size=args.embedded, n_train=args.images,
                      n_test_good=args.images // 4, n_test_per_defect=args.images // 8, classes=["chip"])
    return folder / "embedded", "chip"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mtd", help="the MTD repository folder (MT_*/Imgs and mtd_train_filenames.txt)")
    source.add_argument("--embedded", type=int, metavar="PX", help="generate embedded images of this size")
    parser.add_argument("--images", type=int, default=80, help="embedded: training images (test: about half)")
    parser.add_argument("--size", type=int, default=192, help="input size (MSFlow's MTD setting: 192)")
    parser.add_argument("--backbone", default="resnet18.tv_in1k")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench_image_cache_"))
    try:
        root, class_name = prepare(args, folder)
        size = (args.size, args.size)
        data_hash = dataset_hash(root, class_name)
        extractor = FeatureExtractor(args.backbone, stages=(1, 2, 3), pretrained=False)
        cache = folder / "cache"

        def datasets(cached: bool) -> list[AnomalyDataset]:
            sets = [AnomalyDataset(root, class_name, split, size, validate=False) for split in ("train", "test")]
            if cached:
                for d in sets:
                    d.use_image_cache(cache, data_hash)
            return sets

        def decode(sets) -> list[torch.Tensor]:
            return [b["image"] for d in sets for b in DataLoader(d, batch_size=args.batch_size)]

        plain = datasets(False)
        n_images = sum(len(d) for d in plain)
        decode_plain = timed(lambda: decode(plain))
        build = timed(lambda: datasets(True))  # decodes on threads and writes the file
        cached = datasets(True)
        load = timed(lambda: datasets(True))  # reading and checking the stored file
        decode_cached = timed(lambda: decode(cached))
        batches = decode(cached)
        with torch.no_grad():
            backbone = timed(lambda: [extractor(b) for b in batches])
        result = {
            "data": "MTD (converted)" if args.mtd else f"embedded at {args.embedded} px (PNG)",
            "class": class_name, "images": n_images, "size": args.size, "backbone": args.backbone,
            "cpu_count": os.cpu_count(),
            "decode_s": {"without_cache": decode_plain, "with_cache": decode_cached + load},
            "cache_build_s": build, "cache_load_s": load,
            "cache_file_mib": sum(f.stat().st_size for f in cache.rglob("*.npz")) / 2**20,
            "backbone_s": backbone,
            "extraction_s": {"without_cache": decode_plain + backbone, "with_cache": decode_cached + load + backbone,
                             "first_run_building_it": build + decode_cached + backbone},
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_image_cache.json"
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs[result["data"] + f" -> {args.size} px"] = result
    path.write_text(json.dumps(runs, indent=2) + "\n")
    ex = result["extraction_s"]
    print(f"{result['data']}, {n_images} images -> {args.size} px, backbone {args.backbone}:")
    print(f"  decode  {decode_plain:.1f} s without the cache, {decode_cached + load:.1f} s with it "
          f"(load {load:.2f} s); building it {build:.1f} s; file {result['cache_file_mib']:.0f} MiB")
    print(f"  extraction {ex['without_cache']:.1f} s without, {ex['with_cache']:.1f} s with "
          f"(backbone {backbone:.1f} s)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
