"""How much each reference behaviour of the `official` protocol changes inputs, maps and weights.

Measurements, not tests: the sizes quoted in the README's "Reference behaviours" table.

  pipeline   real MTD images and masks: bilinear (CS-Flow, 768 px) and bilinear-with-antialias
             (U-Flow, 448 px) resizing against LANCZOS, in normalised units; U-Flow's masks
             (bilinear, > 0.5) against NEAREST at 448 px, as a share of the defect pixels.
  nfa        U-Flow's NFA on synthetic latents (N(0, 1), half the images with a planted region
             of higher variance, U-Flow's latent sizes 28x28x816 and 14x14x192): the reference's
             pruning against pruning every single-child chain, and float16-stored maps against
             float32, as the largest change of log10 NFA and the images whose detection changes.
  zero_grad  CFlow on the embedded dataset (ResNet-18, random weights): how far the last decoder
             moves from its initialisation with torch 1.8's zero_grad against torch 2's.
  uflow_metric_size
             U-Flow trained on real MTD (installed by the project's fetch from the upstream
             folder) with pretrained EfficientNet-Lite0 at 448 px: the metrics of the one model's
             stored maps at 256 px (the reference's metric size) against 448 px (the input size).

    python benchmarks/reference_behaviours.py --mtd /path/to/Magnetic-tile-defect-datasets.
    python benchmarks/reference_behaviours.py --mtd ... --only uflow_metric_size   # one part

Each part replaces its own entry in the results file and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import nfa  # noqa: E402
from harness.data import Preprocessing, load_image, load_mask  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "reference_behaviours.json"


def pipeline(mtd: Path, n_images: int) -> dict:
    """Normalised-pixel and mask differences of the per-method pipelines on MTD."""
    defect_images = sorted(p for p in mtd.glob("MT_*/Imgs/*.jpg") if "MT_Free" not in str(p))
    step = max(1, len(defect_images) // n_images)
    picks = defect_images[::step][:n_images]
    out: dict = {"images": len(picks)}
    for name, method, size in (("csflow_bilinear_768", "bilinear", (768, 768)),
                               ("uflow_bilinear_antialias_448", "bilinear_antialias", (448, 448))):
        diffs = [(load_image(p, size, Preprocessing(image_resize=method)) - load_image(p, size)).abs().mean().item()
                 for p in picks]
        out[name] = {"mean_abs_difference": float(np.mean(diffs)), "worst_image": float(np.max(diffs))}
    shares = []
    changed = defect = 0
    for p in picks:
        mask = p.with_suffix(".png")
        nearest = load_mask(mask, (448, 448), "nearest").bool()
        bilinear = load_mask(mask, (448, 448), "bilinear").bool()
        flips = int((nearest ^ bilinear).sum())
        if nearest.any():
            shares.append(flips / int(nearest.sum()))
        changed, defect = changed + flips, defect + int(nearest.sum())
    out["uflow_masks_bilinear_448"] = {"defect_pixels_changed": changed / defect, "worst_image": float(max(shares))}
    return out


def _prune_every_chain(alive, parent, children, log10_p):
    """The earlier rule: every single-child chain (inner ones and the root's too), top-most on ties."""
    chain_of, chains = {}, []
    for k in range(len(alive)):
        if not alive[k]:
            continue
        p = parent[k]
        if p >= 0 and len(children[p]) == 1:
            chain_of[k] = chain_of[p]
            chains[chain_of[k]].append(k)
        else:
            chain_of[k] = len(chains)
            chains.append([k])
    changed = False
    for chain in chains:
        if len(chain) == 1:
            continue
        best = min(chain, key=lambda k: log10_p[k])
        top, bottom = chain[0], chain[-1]
        above, below = parent[top], children[bottom]
        for k in chain:
            if k != best:
                alive[k], children[k] = False, []
        parent[best], children[best] = above, list(below)
        for c in below:
            parent[c] = best
        if above >= 0:
            children[above] = [best if c == top else c for c in children[above]]
        changed = True
    return changed


def _log_nfa(maps: list[torch.Tensor], channels: list[int], prune=None) -> np.ndarray:
    reference = nfa._prune
    nfa._prune = prune or reference
    try:
        return nfa.nfa_log_maps(maps, channels, (256, 256), official_lower_tail=True)
    finally:
        nfa._prune = reference


def _compare(a: np.ndarray, b: np.ndarray) -> dict:
    finite = np.isfinite(a) & np.isfinite(b)
    flips = [(x < 0) ^ (y < 0) for x, y in zip(a, b)]
    return {"max_abs_log10_nfa_change": float(np.abs(a - b)[finite].max()),
            "images_with_changed_detection": int(sum(f.any() for f in flips)),
            "pixels_with_changed_detection": float(np.mean([f.mean() for f in flips]))}


def nfa_sizes(n_images: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    maps = []
    for channels, size in ((816, 28), (192, 14)):
        z = rng.normal(size=(n_images, channels, size, size)).astype(np.float32)
        for i in range(0, n_images, 2):  # a planted region of higher variance in every other image
            y, x = rng.integers(0, size - size // 4, 2)
            z[i, :, y:y + size // 4, x:x + size // 4] *= np.float32(rng.uniform(1.05, 1.3))
        maps.append(torch.from_numpy(-0.5 * (z ** 2).mean(axis=1)))
    channels = [816, 192]
    exact = _log_nfa(maps, channels)
    return {"images": n_images,
            "every_chain_pruned_vs_reference": _compare(_log_nfa(maps, channels, _prune_every_chain), exact),
            "float16_maps_vs_float32": _compare(_log_nfa([m.half() for m in maps], channels), exact)}


def zero_grad(epochs: int) -> dict:
    from harness.config import RunSettings, RunSpec
    from harness.synthetic import generate_embedded
    from harness.train import Trainer

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_embedded(Path(tmp) / "data", seed=0)
        for torch18 in (True, False):
            overrides = dict(backbone="resnet18.tv_in1k", input_size=(128, 128), coupling_blocks=2,
                             cond_channels=16, permute_soft=False, fiber_batch_size=512, batch_size=40, lr=3e-3,
                             meta_epochs=1, sub_epochs=epochs, warmup_meta_epochs=0, torch18_zero_grad=torch18)
            spec = RunSpec("cflow", root, "granite", Path(tmp) / f"run-{torch18}", overrides)
            trainer = Trainer(spec, RunSettings(device="cpu", pretrained=False, progress=False, tracking=False,
                                                figures=False, seed=0))
            trainer._setup()
            start = [p.detach().clone() for p in trainer.model.decoders[-1].parameters()]
            losses = [trainer._train_epoch(e) for e in range(1, epochs + 1)]
            moved = torch.sqrt(sum(((p.detach() - q) ** 2).sum()
                                   for p, q in zip(trainer.model.decoders[-1].parameters(), start)))
            out["torch18" if torch18 else "torch2"] = {"last_decoder_displacement": float(moved),
                                                       "last_epoch_loss": losses[-1]}
    out["displacement_ratio"] = out["torch18"]["last_decoder_displacement"] / out["torch2"]["last_decoder_displacement"]
    return out


def uflow_metric_size(mtd: Path, size: int, epochs: int) -> dict:
    """The same U-Flow model's metrics at 256 px (the reference) and at its input size."""
    import dataclasses

    from harness.config import RunSettings, RunSpec
    from harness.fetch import fetch
    from harness.train import Trainer, rescore_maps
    from methods.lite0 import lite0_settings

    work = Path(tempfile.mkdtemp(prefix="uflow_metric_size_"))
    root = fetch("mtd", data_root=work / "data", source=str(mtd), progress=False)
    overrides = {**lite0_settings("uflow"), "input_size": [size, size], "batch_size": 8, "epochs": epochs,
                 "eval_every": epochs, "nfa_size": None}
    spec = RunSpec(method="uflow", data_root=root, class_name="magnetic_tile", dataset="mtd", out_dir=work / "run",
                   overrides=overrides)
    summary = Trainer(spec, RunSettings(progress=False, tracking=False, figures=False, seed=0)).fit()
    at_256 = rescore_maps(spec)  # the method's metric_size, (256, 256)
    at_input = rescore_maps(dataclasses.replace(spec, overrides={**overrides, "metric_size": None}))
    metrics = ("image_auroc", "pixel_auroc", "aupro", "aupro_code")
    return {"input_size": size, "epochs": epochs, "backbone": "tf_efficientnet_lite0 (ImageNet, PyPI)",
            "at_256": {m: at_256[m] for m in metrics}, f"at_{size}": {m: at_input[m] for m in metrics},
            "difference_points": {m: 100 * (at_256[m] - at_input[m]) for m in metrics},
            "trained_last": {m: summary["last"][m] for m in metrics}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mtd", type=Path, help="the MTD upstream folder (MT_*/Imgs/*.jpg); omit to skip")
    parser.add_argument("--images", type=int, default=40, help="MTD defect images to compare")
    parser.add_argument("--nfa-images", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=3, help="CFlow training epochs")
    parser.add_argument("--uflow-size", type=int, default=448)
    parser.add_argument("--uflow-epochs", type=int, default=1)
    parts = ("pipeline", "nfa", "zero_grad", "uflow_metric_size")
    parser.add_argument("--only", nargs="+", choices=parts, default=list(parts))
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.mtd is not None and "pipeline" in args.only:
        results["pipeline"] = pipeline(args.mtd, args.images)
    if "nfa" in args.only:
        results["nfa"] = nfa_sizes(args.nfa_images)
    if "zero_grad" in args.only:
        results["zero_grad"] = zero_grad(args.epochs)
    if args.mtd is not None and "uflow_metric_size" in args.only:
        results["uflow_metric_size"] = uflow_metric_size(args.mtd, args.uflow_size, args.uflow_epochs)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
