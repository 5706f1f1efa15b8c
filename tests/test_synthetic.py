"""The embedded synthetic dataset: layout, counts, exact masks, determinism, speed."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data import AnomalyDataset, dataset_hash, list_classes, validate_class
from harness.errors import DatasetError
from harness.synthetic import (
    DEFECT_TYPES,
    EMBEDDED_CLASSES,
    GENERATOR_VERSION,
    MANIFEST_NAME,
    generate_embedded,
    read_manifest,
    render_sample,
    sample_rng,
)

SMALL = dict(image_size=64, n_train=2, n_test_good=1, n_test_per_defect=2)


def folder_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> tuple[Path, float]:
    """The default embedded dataset, generated once; returns (root, CPU seconds it took)."""
    start = time.process_time()  # CPU time: robust to other work on a shared machine
    root = generate_embedded(tmp_path_factory.mktemp("data") / "embedded", seed=0)
    return root, time.process_time() - start


def test_generation_is_fast(embedded):
    _, seconds = embedded
    assert seconds < 10.0


def test_default_counts_match_manifest(embedded):
    root, _ = embedded
    manifest = read_manifest(root)
    assert manifest["seed"] == 0 and manifest["generator_version"] == GENERATOR_VERSION
    assert "procedurally generated" in manifest["description"].lower()
    assert list_classes(root) == sorted(EMBEDDED_CLASSES) == sorted(manifest["classes"])
    for name, counts in manifest["classes"].items():
        assert counts["train_good"] == 40 and counts["test_good"] == 10
        assert counts["test_defects"] == {defect: 5 for defect in DEFECT_TYPES[name]}
        assert len(list((root / name / "train" / "good").glob("*.png"))) == 40
        assert len(list((root / name / "test" / "good").glob("*.png"))) == 10
        for defect in DEFECT_TYPES[name]:
            assert len(list((root / name / "test" / defect).glob("*.png"))) == 5
            assert len(list((root / name / "ground_truth" / defect).glob("*_mask.png"))) == 5


def test_every_class_validates_and_loads(embedded):
    root, _ = embedded
    for name in EMBEDDED_CLASSES:
        validate_class(root, name)
        test = AnomalyDataset(root, name, "test", image_size=(64, 64))
        assert len(test) == 10 + 5 * len(DEFECT_TYPES[name])
        item = test[-1]  # a stain: the last defect folder in sorted order
        assert item["image"].shape == (3, 64, 64) and item["label"] == 1 and item["mask"].sum() > 0


def test_mask_files_are_binary_non_empty_and_sized(embedded):
    root, _ = embedded
    areas = []
    for name in EMBEDDED_CLASSES:
        for defect in DEFECT_TYPES[name]:
            for mask_path in sorted((root / name / "ground_truth" / defect).glob("*_mask.png")):
                image_path = root / name / "test" / defect / mask_path.name.replace("_mask", "")
                mask = np.asarray(Image.open(mask_path))
                assert mask.shape == (128, 128) and Image.open(image_path).size == (128, 128)
                assert set(np.unique(mask).tolist()) == {0, 255}
                areas.append(int((mask > 0).sum()))
    assert min(areas) >= 16
    assert max(areas) > 5 * min(areas)  # defects come in very different sizes


@pytest.mark.parametrize("name", EMBEDDED_CLASSES)
def test_mask_is_exactly_the_changed_pixels(name):
    for d, defect in enumerate(DEFECT_TYPES[name]):
        for index in range(4):
            sample = render_sample(name, defect, sample_rng(3, name, "test_defect", d, index), 96)
            changed = np.any(sample.image != sample.clean, axis=-1)
            assert sample.mask.any()
            assert np.array_equal(changed, sample.mask), (name, defect, index)
    good = render_sample(name, None, sample_rng(3, name, "train", 0, 0), 96)
    assert not good.mask.any() and np.array_equal(good.image, good.clean)


@pytest.mark.parametrize("name", EMBEDDED_CLASSES)
def test_normal_images_vary(name):
    images = [render_sample(name, None, sample_rng(0, name, "train", 0, i)).image for i in range(4)]
    for a, b in zip(images, images[1:]):
        assert np.abs(a.astype(int) - b.astype(int)).mean() > 3.0  # not a fixed template + noise


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = folder_digest(generate_embedded(tmp_path / "a", seed=5, **SMALL))
    second = folder_digest(generate_embedded(tmp_path / "b", seed=5, **SMALL))
    other = folder_digest(generate_embedded(tmp_path / "c", seed=6, **SMALL))
    assert first == second
    assert first.keys() == other.keys()
    differing = [k for k in first if k != MANIFEST_NAME and first[k] != other[k]]
    assert len(differing) == len(first) - 1  # every image and mask differs; only counts agree
    for name in EMBEDDED_CLASSES:
        assert dataset_hash(tmp_path / "a", name) == dataset_hash(tmp_path / "b", name)
        assert dataset_hash(tmp_path / "a", name) != dataset_hash(tmp_path / "c", name)


def test_regeneration_keeps_refuses_and_replaces(tmp_path):
    root = generate_embedded(tmp_path / "embedded", classes=["washer"], **SMALL)
    image = root / "washer" / "train" / "good" / "000.png"
    stamp = image.stat().st_mtime_ns
    generate_embedded(root, classes=["washer"], **SMALL)  # same settings: kept as is
    assert image.stat().st_mtime_ns == stamp
    generate_embedded(root, seed=1, classes=["washer"], **SMALL)  # other settings: replaced
    assert read_manifest(root)["seed"] == 1
    # no staging left behind (the lock file stays: deleting a lock others may open breaks it)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".lock") == ["embedded"]

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "data.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not made by generate_embedded"):
        generate_embedded(foreign, **SMALL)
    assert (foreign / "data.txt").read_text() == "keep me"
