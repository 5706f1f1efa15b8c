"""Behaviour every method config shares. Each config is a dataclass holding the method's official
settings; these plain mixins add what the shared loop asks of all of them."""

from __future__ import annotations

from typing import ClassVar

from harness.errors import ConfigError


class MethodConfig:
    """Validation messages that name the setting, and the no-augmentation default."""

    label: ClassVar[str] = "method"  # the method's name as papers write it, for messages

    def _check(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{self.label} setting {name}={getattr(self, name)!r} is invalid: expected {expected}")

    @property
    def augment(self) -> bool:
        """Trained without augmentation, so frozen features can be cached per class."""
        return False


class MetaEpochs:
    """Training counted as meta_epochs x sub_epochs with an evaluation after every meta-epoch, as
    the MSFlow, CFlow and CS-Flow code count it."""

    meta_epochs: int
    sub_epochs: int

    @property
    def epochs(self) -> int:
        """Training epochs (passes over the train set)."""
        return self.meta_epochs * self.sub_epochs

    @property
    def eval_every(self) -> int:
        """Evaluate after this many training epochs (once per meta-epoch)."""
        return self.sub_epochs
