"""A small registry of methods, in the spirit of timm's model registry.

A method is a model class (an nn.Module) decorated with ``@register_method(name)`` whose
``config_class`` attribute is a dataclass holding every setting of the method with its official
default. The model is built as ``ModelClass(config, feature_channels)`` and implements

    forward(features: list[Tensor]) -> FlowOutput(latents, log_jac_det [B])
    loss(out: FlowOutput) -> Tensor (scalar)
    log_likelihood_maps(out) -> list[Tensor]  # per scale [B, h, w], higher = more normal

    config = create_method("msflow", parallel_blocks=(8, 8, 8))
    model = build_model(config, feature_channels=[256, 512, 1024])
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from torch import nn

from harness.config import check_value
from harness.errors import ConfigError
from harness.flows import FlowOutput

__all__ = ["FlowOutput", "MethodEntry", "build_model", "create_method", "list_methods", "register_method"]


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_class: type
    model_class: type[nn.Module]


_METHODS: dict[str, MethodEntry] = {}


def register_method(name: str):
    """Class decorator: register a model class (with a ``config_class`` attribute) under ``name``."""

    def register(model_class: type[nn.Module]) -> type[nn.Module]:
        config_class = getattr(model_class, "config_class", None)
        if config_class is None or not dataclasses.is_dataclass(config_class):
            raise TypeError(f"{model_class.__name__} needs a dataclass attribute 'config_class'")
        if name in _METHODS and _METHODS[name].model_class is not model_class:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = MethodEntry(name, config_class, model_class)
        return model_class

    return register


def list_methods() -> list[str]:
    return sorted(_METHODS)


def _entry(name: str) -> MethodEntry:
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; available methods: {', '.join(list_methods())}")
    return _METHODS[name]


def config_fields(name: str) -> list[str]:
    """The settings a method's config accepts."""
    return [f.name for f in dataclasses.fields(_entry(name).config_class) if f.init]


def create_method(name: str, **overrides: Any):
    """The method's config (a dataclass instance): official defaults with ``overrides`` applied."""
    config_class = _entry(name).config_class
    valid = config_fields(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(map(repr, unknown))} for method {name!r}; "
            f"valid settings: {', '.join(valid)}"
        )
    # Types first, so "1e-3" (a string to YAML 1.1) becomes a number and "false" is refused.
    hints = typing.get_type_hints(config_class)
    checked = {key: check_value(key, value, hints.get(key, Any), f"{name} setting")
               for key, value in overrides.items()}
    return config_class(**checked)


def build_model(config: Any, feature_channels: list[int]) -> nn.Module:
    """Build the model a config belongs to, for backbone features with ``feature_channels``."""
    for entry in _METHODS.values():
        if type(config) is entry.config_class:
            return entry.model_class(config, list(feature_channels))
    raise ConfigError(f"{type(config).__name__} is not the config of a registered method ({', '.join(list_methods())})")
