"""Image view pipelines: SimCLR / BYOL-style views, multi-crop, and evaluation transforms."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from ssl_kit.transforms.base import ViewAugmentation


def _per_view(value: float | Sequence[float], count: int) -> list[float]:
    """A scalar applies to every view; a list gives one value per view (cycled)."""
    if isinstance(value, (int, float)):
        return [float(value)] * count
    values = [float(v) for v in value]
    if not values:
        raise ValueError("per-view probability list must not be empty")
    return [values[i % len(values)] for i in range(count)]


def blur_kernel_size(image_size: int) -> int:
    """About 10% of the image side, odd, as in SimCLR."""
    size = max(3, int(0.1 * image_size))
    return size if size % 2 == 1 else size + 1


class ImageViews(ViewAugmentation):
    """Random-resized-crop views with colour distortion; one class for SimCLR, BYOL and multi-crop.

    SimCLR uses the defaults. BYOL / Barlow Twins use asymmetric views:
    ``blur_prob=[1.0, 0.1], solarize_prob=[0.0, 0.2]``. Multi-crop adds
    ``local_views`` small crops of ``local_size`` pixels.
    """

    def __init__(
        self,
        num_views: int = 2,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        flip_prob: float = 0.5,
        jitter_prob: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_prob: float = 0.2,
        blur_prob: float | list[float] = 0.0,
        solarize_prob: float | list[float] = 0.0,
        local_views: int = 0,
        local_size: int | None = None,
        local_crop_scale: tuple[float, float] = (0.05, 0.4),
    ) -> None:
        if num_views < 1 or local_views < 0:
            raise ValueError(f"num_views must be >= 1 and local_views >= 0, got {num_views}, {local_views}")
        self.num_views = num_views
        self.crop_scale = tuple(crop_scale)
        self.flip_prob = flip_prob
        self.jitter_prob = jitter_prob
        self.jitter = (brightness, contrast, saturation, hue)
        self.grayscale_prob = grayscale_prob
        self.blur_prob = blur_prob
        self.solarize_prob = solarize_prob
        self.local_views = local_views
        self.local_size = local_size
        self.local_crop_scale = tuple(local_crop_scale)

    def _pipeline(self, size: int, scale: tuple[float, float], blur: float, solarize: float) -> T.Compose:
        steps: list = [
            T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(self.flip_prob),
            T.RandomApply([T.ColorJitter(*self.jitter)], p=self.jitter_prob),
            T.RandomGrayscale(self.grayscale_prob),
        ]
        if blur > 0:
            steps.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=blur))
        if solarize > 0:
            steps.append(T.RandomSolarize(128, p=solarize))
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    def build(self) -> None:
        blur = _per_view(self.blur_prob, self.num_views)
        solarize = _per_view(self.solarize_prob, self.num_views)
        self.pipelines = [
            self._pipeline(self.input_spec.side, self.crop_scale, blur[i], solarize[i]) for i in range(self.num_views)
        ]
        local_size = self.local_size or max(8, round(self.input_spec.side * 96 / 224))
        self.pipelines += [
            self._pipeline(local_size, self.local_crop_scale, blur[-1], 0.0) for _ in range(self.local_views)
        ]

    def __call__(self, sample: Image.Image) -> list[Tensor]:
        return [pipeline(sample) for pipeline in self.pipelines]


def eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], center_crop_ratio: float = 1.0
) -> T.Compose:
    """Deterministic transform for evaluation: resize (then centre-crop when ratio < 1), normalise."""
    resize = round(image_size / center_crop_ratio)
    return T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Inverse of ``Normalize`` for visualisation."""
    shape = (1, -1, 1, 1) if images.dim() == 4 else (-1, 1, 1)
    return images * torch.tensor(std, device=images.device).view(shape) + torch.tensor(mean, device=images.device).view(shape)


class Cutout:
    """Fills one random square, of side up to ``max_fraction`` of the image side, with ``value``
    (FixMatch's Cutout; on a tensor in [0, 1], before normalisation)."""

    def __init__(self, max_fraction: float = 0.5, value: float = 0.5) -> None:
        self.max_fraction = max_fraction
        self.value = value

    def __call__(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        side = int(torch.randint(1, max(2, int(self.max_fraction * min(height, width)) + 1), ()).item())
        top = int(torch.randint(0, height - side + 1, ()).item())
        left = int(torch.randint(0, width - side + 1, ()).item())
        image = image.clone()
        image[..., top : top + side, left : left + side] = self.value
        return image


class WeakStrongViews(ViewAugmentation):
    """Self-training views (FixMatch): view 0 weak, view 1 strong, for the same sample.

    Weak: resize to the image size, horizontal flip, and a random translation of up to
    ``translate`` of the side (reflect-padded random crop). Strong: the weak steps, then
    RandAugment (``randaugment_ops`` ops at ``randaugment_magnitude`` of 30) and Cutout of up to
    ``cutout`` of the side. Set ``flip_prob: 0`` where mirroring changes the class (digits).
    """

    def __init__(
        self,
        flip_prob: float = 0.5,
        translate: float = 0.125,
        randaugment_ops: int = 2,
        randaugment_magnitude: int = 10,
        cutout: float = 0.5,
    ) -> None:
        self.flip_prob = flip_prob
        self.translate = translate
        self.randaugment_ops = randaugment_ops
        self.randaugment_magnitude = randaugment_magnitude
        self.cutout = cutout

    def build(self) -> None:
        size = self.input_spec.side
        weak = [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.RandomHorizontalFlip(self.flip_prob),
            T.RandomCrop(size, padding=int(round(self.translate * size)), padding_mode="reflect"),
        ]
        normalize = T.Normalize(self.mean, self.std)
        self.weak = T.Compose([*weak, T.ToTensor(), normalize])
        self.strong = T.Compose(
            [
                *weak,
                T.RandAugment(self.randaugment_ops, self.randaugment_magnitude),
                T.ToTensor(),
                Cutout(self.cutout),
                normalize,
            ]
        )

    def __call__(self, sample: Image.Image) -> list[Tensor]:
        return [self.weak(sample), self.strong(sample)]
