"""The one interface between data and methods for augmentation.

A ``ViewAugmentation`` turns one decoded sample into the list of views a method
trains on. It has two stages so that a batched, on-device implementation can
replace per-sample CPU transforms without touching methods or DataModules:

* ``__call__(sample) -> list[Tensor]`` runs per sample inside loader workers;
* ``on_device(views) -> list[Tensor]`` runs once per batch after transfer to
  the training device (identity for per-sample augmentations).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

from torch import Tensor


class ViewAugmentation(ABC):
    """Makes the training views of one sample; configured by the DataModule."""

    def configure(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        """Receives the dataset's geometry and normalisation before first use."""
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.build()

    @abstractmethod
    def build(self) -> None:
        """Builds the pipelines once ``image_size``, ``mean`` and ``std`` are known."""

    @abstractmethod
    def __call__(self, sample: Any) -> list[Tensor]:
        """Per-sample stage: one decoded sample in, a list of view tensors out."""

    def on_device(self, views: list[Tensor]) -> list[Tensor]:
        """Batched stage on the training device; identity for per-sample pipelines."""
        return views

    @property
    def parts(self) -> tuple[ViewAugmentation, ...]:
        """The augmentations that make the views (itself; a composition lists its members), so a
        DataModule can configure each with modality-specific settings."""
        return (self,)


class PairedViews(ViewAugmentation):
    """Self-training views for any modality: view 0 from ``weak``, view 1 from ``strong`` (each
    configured with ``num_views: 1``), e.g. two ``AudioViews`` or two ``VideoViews`` of different
    strength. Images have a ready pair in ``WeakStrongViews`` (RandAugment + Cutout)."""

    def __init__(self, weak: ViewAugmentation, strong: ViewAugmentation) -> None:
        for name, part in (("weak", weak), ("strong", strong)):
            if getattr(part, "num_views", 1) != 1:
                raise ValueError(f"PairedViews takes one view from each part: set {name}.num_views to 1")
        self.weak, self.strong = weak, strong

    @property
    def parts(self) -> tuple[ViewAugmentation, ViewAugmentation]:
        return self.weak, self.strong

    def configure(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        for part in self.parts:
            part.configure(image_size, mean, std)

    def build(self) -> None:
        """Nothing of its own: each part is built when configured."""

    def __call__(self, sample: Any) -> list[Tensor]:
        return [self.weak(sample)[0], self.strong(sample)[0]]

    def on_device(self, views: list[Tensor]) -> list[Tensor]:
        return [part.on_device([view])[0] for part, view in zip(self.parts, views)]
