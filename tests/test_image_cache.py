"""The decoded-image cache gives exactly the uncached items, is keyed by the data, and rebuilds a
damaged file."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from harness.data import AnomalyDataset, Preprocessing, dataset_hash
from harness.errors import ConfigError
from harness.synthetic import generate_embedded


@pytest.fixture()
def data(tmp_path):
    return generate_embedded(tmp_path / "data", seed=0, image_size=48, n_train=6, n_test_good=3,
                             n_test_per_defect=2, classes=["chip"])


def cached(data, split, cache, size=(40, 40)):
    dataset = AnomalyDataset(data, "chip", split, size, validate=False)
    dataset.use_image_cache(cache, dataset_hash(data, "chip"))
    return dataset


def assert_same_items(a: AnomalyDataset, b: AnomalyDataset) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        assert (x["label"], x["path"]) == (y["label"], y["path"])


def test_cached_items_equal_decoded_items_and_are_reused(data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    for split in ("train", "test"):
        plain = AnomalyDataset(data, "chip", split, (40, 40), validate=False)
        first = cached(data, split, cache)
        assert_same_items(first, plain)
        assert first[0]["image"].shape == (3, 40, 40)
    files = sorted((cache / "data" / "chip").glob("*.npz"))
    assert [f.name.split("-")[0] for f in files] == ["test", "train"]
    assert all(f.name.split("-")[1:3] == ["40x40", "lanczos_nearest"] for f in files)
    stamp = [f.stat().st_mtime_ns for f in files]
    # Reused, not rebuilt: a later dataset reads the stored pixels and decodes nothing.
    monkeypatch.setattr(AnomalyDataset, "_decode", lambda self, i: pytest.fail("decoded again"))
    again = cached(data, "test", cache)
    assert [f.stat().st_mtime_ns for f in files] == stamp
    assert again.decoded.images.dtype == np.uint8 and again.decoded.images.shape[1:] == (40, 40, 3)


def test_other_size_and_resize_are_other_files(data, tmp_path):
    cache = tmp_path / "cache"
    cached(data, "train", cache, (40, 40))
    cached(data, "train", cache, (32, 48))
    bilinear = Preprocessing(image_resize="bilinear", mask_resize="bilinear")
    dataset = AnomalyDataset(data, "chip", "train", (40, 40), validate=False, preprocessing=bilinear)
    dataset.use_image_cache(cache, dataset_hash(data, "chip"))
    assert_same_items(dataset, AnomalyDataset(data, "chip", "train", (40, 40), validate=False, preprocessing=bilinear))
    names = sorted(f.name.split("-", 1)[1].rsplit("-", 1)[0] for f in (cache / "data" / "chip").glob("*.npz"))
    assert names == ["32x48-lanczos_nearest", "40x40-bilinear_bilinear", "40x40-lanczos_nearest"]


def test_float_resizing_is_not_cached(data, tmp_path):
    """8-bit storage would round a floating-point resize (U-Flow's bilinear with antialias)."""
    dataset = AnomalyDataset(data, "chip", "train", (40, 40), validate=False,
                             preprocessing=Preprocessing(image_resize="bilinear_antialias"))
    with pytest.raises(ConfigError, match="floating point"):
        dataset.use_image_cache(tmp_path / "cache", dataset_hash(data, "chip"))


def test_changed_data_replaces_the_stale_file(data, tmp_path):
    cache = tmp_path / "cache"
    cached(data, "train", cache)
    image = sorted((data / "chip" / "train" / "good").iterdir())[0]
    image.write_bytes(sorted((data / "chip" / "test" / "good").iterdir())[0].read_bytes())
    fresh = cached(data, "train", cache)
    assert_same_items(fresh, AnomalyDataset(data, "chip", "train", (40, 40), validate=False))
    assert len(list((cache / "data" / "chip").glob("train-*.npz"))) == 1


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_file_is_detected_and_rebuilt(data, tmp_path, damage):
    cache = tmp_path / "cache"
    cached(data, "test", cache)
    (path,) = (cache / "data" / "chip").glob("test-*.npz")
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0xFF  # one byte of pixels
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=f"{path.name}.*decoding the images again"):
        rebuilt = cached(data, "test", cache)
    assert_same_items(rebuilt, AnomalyDataset(data, "chip", "test", (40, 40), validate=False))
    assert cached(data, "test", cache).decoded is not None  # the rebuilt file now loads cleanly


def test_native_size_is_refused(data, tmp_path):
    dataset = AnomalyDataset(data, "chip", "train", None, validate=False)
    with pytest.raises(ConfigError, match="fixed image_size"):
        dataset.use_image_cache(tmp_path / "cache", dataset_hash(data, "chip"))
