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
from typing import Any

from torch import Tensor

from ssl_kit.inputs import InputSpec


class ViewAugmentation(ABC):
    """Makes the training views of one sample; configured by the DataModule."""

    def configure(self, input_spec: InputSpec) -> None:
        """Receives the description of the input (geometry, normalisation, front end) before first use."""
        self.input_spec = input_spec
        self.mean, self.std = input_spec.mean, input_spec.std
        self.build()

    @abstractmethod
    def build(self) -> None:
        """Builds the pipelines once ``input_spec`` is known."""

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

    def configure(self, input_spec: InputSpec) -> None:
        for part in self.parts:
            part.configure(input_spec)

    def build(self) -> None:
        """Nothing of its own: each part is built when configured."""

    def __call__(self, sample: Any) -> list[Tensor]:
        return [self.weak(sample)[0], self.strong(sample)[0]]

    def on_device(self, views: list[Tensor]) -> list[Tensor]:
        return [part.on_device([view])[0] for part, view in zip(self.parts, views)]
