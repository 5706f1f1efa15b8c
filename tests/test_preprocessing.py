"""Per-method image pipelines (harness.data.Preprocessing) and what each protocol gives a method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from harness import grid
from harness.data import DEFAULT_PREPROCESSING, AnomalyDataset, Preprocessing, load_image, load_mask
from harness.errors import ConfigError
from methods import create_method, list_methods

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
SIZE = (12, 20)  # (H, W), non-square so that mix-ups show


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (37, 51)) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def normalised(pixels: torch.Tensor, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def unit(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def test_key_names_every_setting_and_is_stable():
    assert DEFAULT_PREPROCESSING.key() == "image=lanczos|mask=nearest|mean=0.485,0.456,0.406|std=0.229,0.224,0.225"
    assert Preprocessing(mean=[0.485, 0.456, 0.406]).key() == DEFAULT_PREPROCESSING.key()  # lists from YAML
    keys = {Preprocessing(image_resize=m).key() for m in ("lanczos", "bilinear", "bilinear_antialias")}
    assert len(keys) == 3
    assert Preprocessing(mean=(0.5,) * 3, std=(0.225,) * 3).key().endswith("mean=0.5,0.5,0.5|std=0.225,0.225,0.225")


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="image_resize='area'"):
        Preprocessing(image_resize="area")
    with pytest.raises(ConfigError, match="mask_resize='bicubic'"):
        Preprocessing(mask_resize="bicubic")
    with pytest.raises(ConfigError, match="three values"):
        Preprocessing(mean=(0.5, 0.5))
    with pytest.raises(ConfigError, match="image_resize='area'"):
        create_method("csflow", image_resize="area").preprocessing()


@pytest.mark.parametrize("method,pil_filter", [("lanczos", Image.LANCZOS), ("bilinear", Image.BILINEAR)])
def test_pil_resize_methods(tmp_path, method, pil_filter):
    path = write_image(tmp_path / "a.png")
    expected = normalised(unit(Image.open(path).convert("RGB").resize((SIZE[1], SIZE[0]), pil_filter)))
    torch.testing.assert_close(load_image(path, SIZE, Preprocessing(image_resize=method)), expected)


def test_bilinear_antialias_resizes_the_float_image(tmp_path):
    path = write_image(tmp_path / "a.png")
    pixels = unit(Image.open(path).convert("RGB"))[None]
    expected = F.interpolate(pixels, size=SIZE, mode="bilinear", align_corners=False, antialias=True)[0]
    got = load_image(path, SIZE, Preprocessing(image_resize="bilinear_antialias"))
    torch.testing.assert_close(got, normalised(expected))
    lanczos = load_image(path, SIZE)
    assert (got - lanczos).abs().mean() > 1e-3  # a different pipeline, not a relabelled one


def test_normalisation_statistics(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((4, 4, 3), 51, dtype=np.uint8)).save(path)  # 0.2 in every channel
    got = load_image(path, None, Preprocessing(mean=(0.5,) * 3, std=(0.225,) * 3))
    torch.testing.assert_close(got, torch.full((3, 4, 4), (0.2 - 0.5) / 0.225))


def test_bilinear_masks_are_thresholded_at_one_half(tmp_path):
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[10:13, 5:35] = 255  # a 3-pixel line: NEAREST and bilinear disagree at a quarter size
    mask[20:30, 20:30] = 255
    path = tmp_path / "m_mask.png"
    Image.fromarray(mask).save(path)
    got = load_mask(path, (10, 10), "bilinear")
    soft = F.interpolate(torch.from_numpy(mask > 0).float()[None, None], size=(10, 10), mode="bilinear",
                         align_corners=False, antialias=True)[0]
    assert torch.equal(got, (soft > 0.5).float())
    assert not torch.equal(got, load_mask(path, (10, 10), "nearest"))
    assert set(got.unique().tolist()) <= {0.0, 1.0}


def test_the_reader_takes_a_preprocessing(tmp_path):
    for split in ("train/good", "test/good", "test/crack"):
        (tmp_path / "c" / split).mkdir(parents=True)
        write_image(tmp_path / "c" / split / "000.png")
    (tmp_path / "c" / "ground_truth" / "crack").mkdir(parents=True)
    Image.fromarray(np.full((37, 51), 255, dtype=np.uint8)).save(tmp_path / "c/ground_truth/crack/000_mask.png")
    pipeline = Preprocessing(image_resize="bilinear", mean=(0.5,) * 3, std=(0.225,) * 3)
    dataset = AnomalyDataset(tmp_path, "c", "train", SIZE, preprocessing=pipeline)
    torch.testing.assert_close(dataset[0]["image"], load_image(dataset.records[0].path, SIZE, pipeline))


# --- what each protocol gives a method ---------------------------------------------------------------


def protocol_config(protocol: str, dataset: str, method: str):
    params = grid.load(PARAMS)
    return create_method(method, **grid.method_overrides(params, protocol, dataset, method))


def test_official_pipelines_are_the_references():
    assert create_method("msflow").preprocessing() == DEFAULT_PREPROCESSING
    assert create_method("cflow").preprocessing() == DEFAULT_PREPROCESSING
    assert create_method("csflow").preprocessing() == Preprocessing(image_resize="bilinear")
    uflow = create_method("uflow")
    assert uflow.preprocessing() == Preprocessing(image_resize="bilinear_antialias", mask_resize="bilinear")
    assert uflow.metric_size == (256, 256)
    stc = protocol_config("official", "mstc", "cflow").preprocessing()
    assert (stc.mean, stc.std) == ((0.5,) * 3, (0.225,) * 3)
    assert protocol_config("official", "mvtec_ad", "cflow").preprocessing() == DEFAULT_PREPROCESSING


def test_official_protocol_keeps_the_reference_behaviours():
    assert protocol_config("official", "mvtec_ad", "cflow").torch18_zero_grad is True
    assert protocol_config("official", "mvtec_ad", "csflow").static_padding_size == 456
    assert protocol_config("official", "mvtec_ad", "uflow").official_lower_tail is True


@pytest.mark.parametrize("dataset", ["mvtec_ad", "mstc"])
def test_unified_protocol_has_one_pipeline_and_no_reference_quirks(dataset):
    configs = {m: protocol_config("unified", dataset, m) for m in list_methods()}
    assert {c.preprocessing() for c in configs.values()} == {DEFAULT_PREPROCESSING}
    assert configs["uflow"].metric_size is None and configs["uflow"].official_lower_tail is False
    assert configs["cflow"].torch18_zero_grad is False
    assert configs["csflow"].static_padding_size is None
