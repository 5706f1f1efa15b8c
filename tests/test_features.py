"""Backbone features: stages, strides, reflect padding, freezing, pooling, cache keys, and the
error a user gets when pretrained weights are missing. Random weights only (no download)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import harness.features as features
import harness.weights as weights
from harness.errors import ConfigError, HarnessError
from harness.features import FeatureExtractor, create_backbone

RESNET18 = "resnet18.tv_in1k"


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    torch.manual_seed(0)
    return FeatureExtractor(RESNET18, pretrained=False)


def test_stage_channels_and_strides(extractor):
    assert extractor.channels == [64, 128, 256]
    assert extractor.strides == [4, 8, 16]
    stage_maps = extractor.backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape[1:]) for m in stage_maps] == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]


def test_reflect_padding_on_3x3_and_stem_convs_only(extractor):
    convs = {name: m for name, m in extractor.backbone.named_modules() if isinstance(m, nn.Conv2d)}
    padded = {name for name, m in convs.items() if m.padding_mode == "reflect"}
    assert padded == {name for name, m in convs.items() if m.kernel_size in ((3, 3), (7, 7))}
    assert "conv1" in padded and any("downsample" in name for name in set(convs) - padded)
    assert extractor.backbone.maxpool.padding == 1  # stem max-pool unchanged

    x = torch.randn(1, 3, 32, 32)
    stem = extractor.backbone.conv1
    assert torch.allclose(stem(x), F.conv2d(F.pad(x, (3, 3, 3, 3), mode="reflect"), stem.weight, stride=2), atol=1e-5)

    zero_padded = create_backbone(RESNET18, pretrained=False, padding_mode="zeros")
    assert all(m.padding_mode == "zeros" for m in zero_padded.modules() if isinstance(m, nn.Conv2d))
    zero_padded.load_state_dict(extractor.backbone.state_dict())
    assert not torch.allclose(zero_padded(x)[0], extractor.backbone(x)[0])


def test_backbone_is_frozen(extractor):
    assert all(not p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert not extractor.backbone.training and not any(m.training for m in extractor.backbone.modules())
    images = torch.randn(2, 3, 64, 64, requires_grad=True)
    assert all(not f.requires_grad for f in extractor(images))
    assert extractor(images)[0].grad_fn is None


@pytest.mark.parametrize(
    "pool, kernel, sizes",
    [("avg", 3, [8, 4, 2]), ("max", 3, [8, 4, 2]), ("avg", 5, [8, 4, 2]), ("none", 3, [16, 8, 4])],
)
def test_pooled_sizes(extractor, pool, kernel, sizes):
    extractor.pool = features._stage_pool(pool, kernel)
    try:
        maps = extractor(torch.randn(2, 3, 64, 64))
    finally:
        extractor.pool = features._stage_pool("avg", 3)
    assert [tuple(m.shape) for m in maps] == [(2, c, s, s) for c, s in zip([64, 128, 256], sizes)]


def test_average_pool_counts_padding():
    pooled = features._stage_pool("avg", 3)(torch.ones(1, 1, 4, 4))
    assert pooled[0, 0, 0, 0] == pytest.approx(4 / 9)  # corner window: 4 real pixels of 9


def test_cache_key_follows_settings(extractor):
    base = extractor.cache_key()
    assert RESNET18 in base and "stages=1,2,3" in base and "avg3" in base and "reflect" in base
    assert "weights=random" in base
    variants = [
        FeatureExtractor(RESNET18, pretrained=False, pool="max"),
        FeatureExtractor(RESNET18, pretrained=False, pool_kernel=5),
        FeatureExtractor(RESNET18, pretrained=False, stages=(2, 3)),
        FeatureExtractor(RESNET18, pretrained=False, padding_mode="zeros"),
    ]
    keys = [base] + [v.cache_key() for v in variants]
    assert len(set(keys)) == len(keys)


def test_missing_pretrained_weights_give_instructions(monkeypatch):
    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        raise AssertionError("only the pretrained path is exercised here")

    monkeypatch.setattr(features.timm, "create_model", offline)
    monkeypatch.setattr(weights, "_hub_cached_file", lambda name: ("timm/" + name, None))
    monkeypatch.setattr(weights, "_hub_reachable", lambda timeout=3.0: True)
    with pytest.raises(HarnessError) as error:
        create_backbone("wide_resnet50_2.tv_in1k", pretrained=True)
    message = str(error.value)
    assert "wide_resnet50_2.tv_in1k" in message and "huggingface" in message
    assert "--weights wide_resnet50_2.tv_in1k=" in message and "runtime.weights" in message


def test_bad_weights_path(tmp_path):
    with pytest.raises(HarnessError, match="does not exist"):
        create_backbone(RESNET18, weights_path=tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(HarnessError, match="corrupt.pth"):
        create_backbone(RESNET18, weights_path=corrupt)


def test_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = create_backbone(RESNET18, pretrained=False)
    checkpoint = tmp_path / "resnet18.pth"
    # A torchvision-style state dict: the full classifier's keys (layer4, fc included).
    full = features.timm.create_model("resnet18", pretrained=False)
    state = full.state_dict()
    state.update(source.state_dict())  # the feature model keeps the classifier's key names
    torch.save(state, checkpoint)
    loaded = FeatureExtractor(RESNET18, weights_path=checkpoint)
    assert all(torch.equal(v, loaded.backbone.state_dict()[k]) for k, v in source.state_dict().items())
    assert "file:resnet18.pth" in loaded.cache_key()


def test_backbone_names_are_checked():
    with pytest.raises(ConfigError, match="weight tag"):
        create_backbone("resnet18", pretrained=True)
    with pytest.raises(ConfigError, match="unknown backbone"):
        create_backbone("resnet_nope.tv_in1k", pretrained=False)
