"""Behaviour every method config shares. Each config is a dataclass holding the method's official
settings; these plain mixins add what the shared loop asks of all of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness.data import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from harness.errors import ConfigError


@dataclass
class MethodConfig:
    """Validation messages that name the setting, the no-augmentation default, and the image
    pipeline of the method's reference code (harness.data.Preprocessing): how images and masks
    are resized and the normalisation statistics. The defaults are MSFlow's and CFlow's (LANCZOS,
    NEAREST, ImageNet); a method whose reference differs sets its own defaults."""

    label: ClassVar[str] = "method"  # the method's name as papers write it, for messages

    image_resize: str = "lanczos"  # harness.data.IMAGE_RESIZE_METHODS
    mask_resize: str = "nearest"  # harness.data.MASK_RESIZE_METHODS
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def preprocessing(self) -> Preprocessing:
        """The image pipeline as the data reader takes it (a ConfigError names a bad setting)."""
        return Preprocessing(self.image_resize, self.mask_resize, tuple(self.mean), tuple(self.std))

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
