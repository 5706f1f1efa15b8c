"""The MVTec-layout reader: labels, masks, preprocessing, and every validation error."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AnomalyDataset,
    ImageRecord,
    dataset_hash,
    index_split,
    list_classes,
    validate_class,
)
from harness.errors import DatasetError

WIDTH, HEIGHT = 20, 12  # non-square on purpose, so (H, W) mix-ups show


def save_image(path: Path, array: np.ndarray, **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_args)
    return path


def random_rgb(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def make_class(
    root: Path,
    name: str = "widget",
    n_train: int = 2,
    n_good: int = 1,
    defects: dict[str, int] | None = None,
    ext: str = "png",
) -> Path:
    """A tiny class: random RGB images, and a square defect in the top-left corner of each mask."""
    defects = {"crack": 2} if defects is None else defects
    class_dir = root / name
    seed = 0
    for i in range(n_train):
        save_image(class_dir / "train" / "good" / f"{i:03d}.{ext}", random_rgb(seed := seed + 1))
    for i in range(n_good):
        save_image(class_dir / "test" / "good" / f"{i:03d}.{ext}", random_rgb(seed := seed + 1))
    for defect, count in defects.items():
        for i in range(count):
            save_image(class_dir / "test" / defect / f"{i:03d}.{ext}", random_rgb(seed := seed + 1))
            mask = np.zeros((HEIGHT, WIDTH), np.uint8)
            mask[:4, :6] = 255
            save_image(class_dir / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return class_dir


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def expected_tensor(image: Image.Image) -> torch.Tensor:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    normalised = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(normalised).permute(2, 0, 1)


def validation_error(root: Path, name: str = "widget", **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        validate_class(root, name, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Reading


def test_index_split_is_sorted_and_labelled(tmp_path):
    class_dir = make_class(tmp_path, defects={"scratch": 1, "crack": 2})
    records = index_split(tmp_path, "widget", "test")
    assert [(r.defect, r.path.name, r.label) for r in records] == [
        ("crack", "000.png", 1),
        ("crack", "001.png", 1),
        ("good", "000.png", 0),
        ("scratch", "000.png", 1),
    ]
    assert records[0].mask == class_dir / "ground_truth" / "crack" / "000_mask.png"
    assert records[2].mask is None
    train = index_split(tmp_path, "widget", "train")
    assert all(r == ImageRecord(r.path, 0, "good", None) for r in train) and len(train) == 2


def test_items_have_labels_masks_and_shapes(tmp_path):
    make_class(tmp_path)
    dataset = AnomalyDataset(tmp_path, "widget", "test", image_size=(6, 10))
    assert len(dataset) == 3 and [r.label for r in dataset.records] == [1, 1, 0]
    defective, good = dataset[0], dataset[2]
    assert defective["image"].shape == (3, 6, 10) and defective["image"].dtype == torch.float32
    assert defective["mask"].shape == (1, 6, 10) and defective["mask"].dtype == torch.float32
    assert defective["label"] == 1 and good["label"] == 0
    assert defective["path"].endswith("crack/000.png")
    # the mask marks the top-left 4x6 of 12x20 pixels: 2x3 after halving
    expected = torch.zeros(1, 6, 10)
    expected[:, :2, :3] = 1
    assert torch.equal(defective["mask"], expected)
    assert torch.equal(good["mask"], torch.zeros(1, 6, 10))


def test_train_split_and_dataloader(tmp_path):
    make_class(tmp_path)
    dataset = AnomalyDataset(tmp_path, "widget", "train", image_size=8)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["label"].tolist() == [0, 0]
    assert batch["mask"].sum() == 0 and len(batch["path"]) == 2


def test_imagenet_normalisation_of_one_pixel(tmp_path):
    make_class(tmp_path, n_train=1, defects={})
    colour = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    colour[...] = (255, 0, 128)
    save_image(tmp_path / "widget" / "test" / "good" / "000.png", colour)
    item = AnomalyDataset(tmp_path, "widget", "test", image_size=None)[0]
    assert item["image"].shape == (3, HEIGHT, WIDTH)  # None keeps the native size
    expected = [(255 / 255 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert torch.allclose(item["image"][:, 5, 7], torch.tensor(expected), atol=1e-6)


def test_resize_is_pil_lanczos_straight_to_size(tmp_path):
    make_class(tmp_path, defects={})
    path = tmp_path / "widget" / "train" / "good" / "000.png"
    item = AnomalyDataset(tmp_path, "widget", "train", image_size=(7, 9))[0]
    with Image.open(path) as image:
        lanczos = expected_tensor(image.resize((9, 7), Image.LANCZOS))
        bilinear = expected_tensor(image.resize((9, 7), Image.BILINEAR))
    assert torch.allclose(item["image"], lanczos, atol=1e-6)
    assert not torch.allclose(item["image"], bilinear, atol=1e-3)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_other_modes_become_three_channels(tmp_path, mode):
    make_class(tmp_path, defects={})
    path = tmp_path / "widget" / "train" / "good" / "000.png"
    Image.fromarray(random_rgb(7)).convert(mode).save(path)
    image = AnomalyDataset(tmp_path, "widget", "train", image_size=None)[0]["image"]
    assert image.shape == (3, HEIGHT, WIDTH)
    with Image.open(path) as original:
        assert torch.allclose(image, expected_tensor(original.convert("RGB")), atol=1e-6)
    if mode in ("L", "LA"):  # greyscale replicated: equal values before normalisation
        std, mean = torch.tensor(IMAGENET_STD), torch.tensor(IMAGENET_MEAN)
        pixels = image * std.view(3, 1, 1) + mean.view(3, 1, 1)
        assert torch.allclose(pixels[0], pixels[1], atol=1e-6)
        assert torch.allclose(pixels[0], pixels[2], atol=1e-6)


def test_mask_is_resized_nearest_then_binarised(tmp_path):
    make_class(tmp_path, defects={"crack": 1})
    mask = np.random.default_rng(3).choice([0, 1, 128, 255], size=(HEIGHT, WIDTH)).astype(np.uint8)
    mask_path = tmp_path / "widget" / "ground_truth" / "crack" / "000_mask.png"
    save_image(mask_path, mask)
    item = AnomalyDataset(tmp_path, "widget", "test", image_size=(5, 7))[0]
    expected = np.asarray(Image.fromarray(mask).resize((7, 5), Image.NEAREST)) != 0
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(item["mask"][0], torch.from_numpy(expected).float())


def test_jpeg_images_are_read(tmp_path):
    make_class(tmp_path, ext="jpg")
    validate_class(tmp_path, "widget")
    dataset = AnomalyDataset(tmp_path, "widget", "test", image_size=(6, 10))
    assert len(dataset) == 3 and dataset[0]["image"].shape == (3, 6, 10)


def test_list_classes_ignores_files_and_hidden(tmp_path):
    make_class(tmp_path, "b")
    make_class(tmp_path, "a")
    (tmp_path / ".cache").mkdir()
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    assert list_classes(tmp_path) == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# Validation errors: each names the file and says what to do


def test_valid_class_passes(tmp_path):
    make_class(tmp_path)
    validate_class(tmp_path, "widget")


def test_missing_train_folder(tmp_path):
    shutil.rmtree(make_class(tmp_path) / "train")
    message = validation_error(tmp_path)
    assert "widget/train/ is missing" in message and "create widget/train/good/" in message


def test_missing_train_good_folder(tmp_path):
    class_dir = make_class(tmp_path)
    (class_dir / "train" / "good").rename(class_dir / "train" / "normal")
    message = validation_error(tmp_path)
    assert "widget/train/good/ is missing" in message
    assert "widget/train/normal/ is not read" in message


def test_missing_test_folder(tmp_path):
    shutil.rmtree(make_class(tmp_path) / "test")
    message = validation_error(tmp_path)
    assert "widget/test/ is missing" in message and "create widget/test/good/" in message


def test_missing_mask(tmp_path):
    class_dir = make_class(tmp_path)
    (class_dir / "ground_truth" / "crack" / "001_mask.png").unlink()
    message = validation_error(tmp_path)
    assert "widget/test/crack/001.png has no mask" in message
    assert "expected widget/ground_truth/crack/001_mask.png" in message
    assert "Add a PNG mask" in message


def test_mask_size_mismatch(tmp_path):
    class_dir = make_class(tmp_path)
    save_image(class_dir / "ground_truth" / "crack" / "000_mask.png", np.zeros((10, 10), np.uint8))
    message = validation_error(tmp_path)
    assert "widget/ground_truth/crack/000_mask.png is 10x10" in message
    assert f"widget/test/crack/000.png is {WIDTH}x{HEIGHT}" in message
    assert "export the mask again" in message


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_image(tmp_path, ext):
    make_class(tmp_path, ext=ext)
    big = random_rgb(5, 64, 64)
    path = save_image(tmp_path / "widget" / "train" / "good" / f"001.{ext}", big)
    truncate(path)
    message = validation_error(tmp_path)
    assert f"widget/train/good/001.{ext} cannot be read" in message
    assert "truncated" in message and "replace it with a good copy" in message
    validate_class(tmp_path, "widget", check_images=False)  # structure alone is fine


def test_truncated_png_caught_by_full_decode_too(tmp_path):
    make_class(tmp_path)
    path = save_image(tmp_path / "widget" / "test" / "good" / "000.png", random_rgb(9, 64, 64))
    truncate(path, 0.8)
    assert "widget/test/good/000.png" in validation_error(tmp_path, full_decode=True)


def test_corrupt_byte_in_png(tmp_path):
    make_class(tmp_path)
    path = save_image(tmp_path / "widget" / "train" / "good" / "001.png", random_rgb(5, 64, 64))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the pixel data: its checksum no longer matches
    path.write_bytes(bytes(data))
    assert "widget/train/good/001.png cannot be read" in validation_error(tmp_path)


def test_garbage_file_with_image_extension(tmp_path):
    make_class(tmp_path)
    (tmp_path / "widget" / "test" / "good" / "001.png").write_text("not an image")
    message = validation_error(tmp_path)
    assert "widget/test/good/001.png cannot be read as an image" in message


def test_empty_class(tmp_path):
    make_class(tmp_path, "other")
    (tmp_path / "widget").mkdir()
    message = validation_error(tmp_path)
    assert "widget/ is empty" in message and "create widget/train/good/" in message


def test_empty_splits(tmp_path):
    class_dir = make_class(tmp_path)
    for image in (class_dir / "train" / "good").iterdir():
        image.unlink()
    shutil.rmtree(class_dir / "test")
    (class_dir / "test" / "good").mkdir(parents=True)
    message = validation_error(tmp_path)
    assert "widget/train/good/ holds no images" in message
    assert "widget/test/ holds no images" in message


def test_loose_test_image(tmp_path):
    make_class(tmp_path)
    save_image(tmp_path / "widget" / "test" / "stray.png", random_rgb(1))
    assert "widget/test/stray.png is not in a sub-folder" in validation_error(tmp_path)


def test_unknown_class_lists_existing_ones(tmp_path):
    make_class(tmp_path, "bottle")
    make_class(tmp_path, "cable")
    with pytest.raises(DatasetError) as info:
        AnomalyDataset(tmp_path, "botle", "train", image_size=8)
    message = str(info.value)
    assert "Class 'botle' not found" in message and "bottle, cable" in message


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        validate_class(tmp_path / "nowhere", "widget")


def test_all_problems_reported_together(tmp_path):
    class_dir = make_class(tmp_path, defects={"crack": 25})
    shutil.rmtree(class_dir / "ground_truth")
    (class_dir / "train" / "good" / "000.png").write_bytes(b"garbage")
    message = validation_error(tmp_path)
    assert "(26 problems)" in message
    assert "widget/train/good/000.png cannot be read" in message  # a different kind, same report
    assert "... and 6 more" in message
    assert message.count("\n  - ") == 20


def test_validation_notices_changed_files(tmp_path):
    make_class(tmp_path)
    validate_class(tmp_path, "widget")
    validate_class(tmp_path, "widget")  # remembered, cheap
    (tmp_path / "widget" / "test" / "good" / "000.png").write_text("broken")
    assert "widget/test/good/000.png" in validation_error(tmp_path)


def test_validation_of_400_images_is_fast(tmp_path):
    image = random_rgb(0, 64, 64)
    for i in range(400):
        save_image(tmp_path / "widget" / "train" / "good" / f"{i:03d}.png", image)
    save_image(tmp_path / "widget" / "test" / "good" / "000.png", image)
    start = time.perf_counter()
    validate_class(tmp_path, "widget")
    assert time.perf_counter() - start < 3.0


# ---------------------------------------------------------------------------------------------
# Hash


def test_dataset_hash_tracks_paths_and_bytes(tmp_path):
    make_class(tmp_path / "a")
    make_class(tmp_path / "b")
    first = dataset_hash(tmp_path / "a", "widget")
    assert len(first) == 64
    assert first == dataset_hash(tmp_path / "b", "widget")  # same files elsewhere: same hash
    image = tmp_path / "b" / "widget" / "test" / "good" / "000.png"
    image.rename(image.with_name("001.png"))
    renamed = dataset_hash(tmp_path / "b", "widget")
    assert renamed != first
    data = bytearray(image.with_name("001.png").read_bytes())
    data[-20] ^= 1
    image.with_name("001.png").write_bytes(bytes(data))
    assert dataset_hash(tmp_path / "b", "widget") not in (first, renamed)
