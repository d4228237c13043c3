"""Batched, on-device image and video views: ``ImageViews``' and ``VideoViews``' augmentations with
per-sample random parameters, computed once per batch on the training device, so loader workers
only decode.

Stages: ``__call__`` (loader workers) returns ONE decoded uint8 sample however many views are made,
``[(3, S, S)]`` for an image and ``[(T, 3, S, S)]`` for a clip, so a batch crosses to the device
once and in uint8; ``on_device`` turns that batch into the normalised float views. A clip is folded
into the batch dimension (``B * T`` frames) with its parameters repeated for each of its frames, so
video runs the image code and every frame of a clip gets the same crop, flip, jitter, grayscale and
erased rectangle, as torchvision's v2 transforms give a ``Video``.

Differences from the per-sample pipelines, all by design:

* crops are taken from the decoded square of side ``S = decode_size`` (default the input's side):
  the shorter side resized to ``S`` (images: bicubic, as ``ImageViews``; clips: antialiased
  bilinear, as ``VideoViews``), then centre-cropped, so crop aspect ratios keep their meaning but a
  non-square frame loses its long-side borders, and clips of different sizes batch;
* resampling is bilinear without antialiasing (``ImageViews``: bicubic in PIL; ``VideoViews``:
  antialiased bilinear, which blurs where a crop is shrunk), and everything is computed in float on
  [0, 1] without the uint8 rounding between steps.

Everything else follows torchvision exactly: ``RandomResizedCrop.get_params`` (10 tries, then the
central crop), ``ColorJitter`` with its four ops in a random order drawn per sample, grayscale,
Gaussian blur with a per-sample sigma, solarisation, ``RandomErasing`` (10 tries, else nothing
erased). ``sample_params`` and ``apply`` expose the two halves so tests can check the parameter
statistics and compare with torchvision's functional API.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision import tv_tensors
from torchvision.transforms import v2

from ssl_kit.transforms.image import ImageViews
from ssl_kit.transforms.kernels import color_jitter, erase, gaussian_blur, grayscale, resized_crop, solarize
from ssl_kit.transforms.video import VideoViews

#: The factor of each jitter op (brightness, contrast, saturation, hue) that leaves an image unchanged.
JITTER_IDENTITY = (1.0, 1.0, 1.0, 0.0)


@dataclass(frozen=True)
class ViewSpec:
    """One view's settings, read off the ``ImageViews`` (torchvision v1) or ``VideoViews`` (v2)
    pipeline it replaces, so the classes cannot drift apart. Ranges are torchvision's (``jitter``: a
    range per op, None where off); ``solarize_threshold`` is on [0, 1]; erasing happens after
    normalisation, as in ``VideoViews``."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_prob: float
    jitter_prob: float
    jitter: tuple[tuple[float, float] | None, ...]
    grayscale_prob: float
    blur_prob: float = 0.0
    blur_kernel: int = 1
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    solarize_threshold: float = 0.5
    erase_prob: float = 0.0
    erase_scale: tuple[float, float] = (0.02, 0.33)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    erase_value: float = 0.0

    @classmethod
    def of(cls, pipeline: T.Compose | v2.Compose) -> ViewSpec:
        fields: dict = {}
        for step in pipeline.transforms:
            inner = step.transforms[0] if isinstance(step, (T.RandomApply, v2.RandomApply)) else None
            if isinstance(step, (T.RandomResizedCrop, v2.RandomResizedCrop)):
                fields.update(size=step.size[0], scale=tuple(step.scale), ratio=tuple(step.ratio))
            elif isinstance(step, (T.RandomHorizontalFlip, v2.RandomHorizontalFlip)):
                fields.update(flip_prob=step.p)
            elif isinstance(inner, (T.ColorJitter, v2.ColorJitter)):
                ranges = (inner.brightness, inner.contrast, inner.saturation, inner.hue)
                fields.update(jitter_prob=step.p, jitter=tuple(None if r is None else tuple(r) for r in ranges))
            elif isinstance(step, (T.RandomGrayscale, v2.RandomGrayscale)):
                fields.update(grayscale_prob=step.p)
            elif isinstance(inner, T.GaussianBlur):
                fields.update(blur_prob=step.p, blur_kernel=inner.kernel_size[0], blur_sigma=tuple(inner.sigma))
            elif isinstance(step, T.RandomSolarize):
                fields.update(solarize_prob=step.p, solarize_threshold=step.threshold / 255)
            elif isinstance(step, v2.RandomErasing) and step.value is not None and len(step.value) == 1:
                fields.update(
                    erase_prob=step.p, erase_scale=tuple(step.scale), erase_ratio=tuple(step.ratio), erase_value=step.value[0]
                )
            elif not isinstance(step, (T.ToTensor, T.Normalize, v2.ToDtype, v2.Normalize)):
                raise TypeError(f"no batched version of {step}")
        return cls(**fields)


@dataclass
class ViewParams:
    """Per-sample random parameters of one view, batch first."""

    box: Tensor  # (B, 4) int64: top, left, height, width of the crop in the decoded image
    flip: Tensor  # (B,) bool
    jitter: Tensor  # (B,) bool: colour jitter applied
    factors: Tensor  # (B, 4): brightness, contrast, saturation factors and hue shift (identity where off)
    order: Tensor  # (B, 4) int64: the op applied at each jitter step, a permutation (torchvision's randperm(4))
    grayscale: Tensor  # (B,) bool
    blur: Tensor  # (B,) bool
    sigma: Tensor  # (B,)
    solarize: Tensor  # (B,) bool
    erase: Tensor  # (B,) bool: a rectangle erased (drawn, and one of the 10 tries fitted)
    erase_box: Tensor  # (B, 4) int64: top, left, height, width of that rectangle in the view

    def repeat_interleave(self, count: int) -> ViewParams:
        """Each sample's parameters ``count`` times in a row: a clip's for each of its frames."""
        return ViewParams(**{f.name: getattr(self, f.name).repeat_interleave(count, 0) for f in dataclasses.fields(self)})


def sample_params(
    spec: ViewSpec, side: int, batch_size: int, generator: torch.Generator | None = None, device: torch.device | None = None
) -> ViewParams:
    """Independent draws per sample with torchvision's distributions, for a decoded square of ``side``."""

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(batch_size, *shape, generator=generator, device=device)

    def chance(p: float) -> Tensor:
        return uniform(0, 1) < p

    ranges = [r or (identity, identity) for r, identity in zip(spec.jitter, JITTER_IDENTITY)]
    jitter = chance(spec.jitter_prob)
    factors = torch.stack([uniform(*r) for r in ranges], 1)
    factors = torch.where(jitter[:, None], factors, torch.tensor(JITTER_IDENTITY, device=device))
    low, high = spec.erase_ratio  # RandomErasing's height is sqrt(area * ratio): the crop's width for 1 / ratio
    erase_box, erase_fits = sample_boxes(spec.size, spec.erase_scale, (1 / high, 1 / low), uniform, strict=True)
    return ViewParams(
        box=sample_boxes(side, spec.scale, spec.ratio, uniform)[0],
        flip=chance(spec.flip_prob),
        jitter=jitter,
        factors=factors,
        order=uniform(0, 1, 4).argsort(1),
        grayscale=chance(spec.grayscale_prob),
        blur=chance(spec.blur_prob),
        sigma=uniform(*spec.blur_sigma),
        solarize=chance(spec.solarize_prob),
        erase=chance(spec.erase_prob) & erase_fits,
        erase_box=erase_box,
    )


def sample_boxes(
    side: int, scale: tuple[float, float], ratio: tuple[float, float], uniform: Callable[..., Tensor], strict: bool = False
) -> tuple[Tensor, Tensor]:
    """torchvision's box search for every sample at once: ``(boxes (B, 4), found (B,))``, the first
    of 10 tries that fits in the square of ``side``, else the whole square (not found). A box fits
    as in ``RandomResizedCrop.get_params`` (sides in 1..side; on the square the ratio range holds 1,
    so its central fallback is the whole square), or with ``strict`` as in ``RandomErasing`` (sides
    below ``side``)."""
    area = side * side * uniform(*scale, 10)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1]), 10))
    width, height = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    if strict:
        fits = (width < side) & (height < side)
    else:
        fits = (width > 0) & (width <= side) & (height > 0) & (height <= side)
    first = fits.byte().argmax(1, keepdim=True)
    found = fits.any(1)
    width = torch.where(found, width.gather(1, first).squeeze(1), side)
    height = torch.where(found, height.gather(1, first).squeeze(1), side)
    top = (uniform(0, 1) * (side - height + 1)).floor().minimum(side - height)
    left = (uniform(0, 1) * (side - width + 1)).floor().minimum(side - width)
    return torch.stack([top, left, height, width], 1).long(), found


def augment(images: Tensor, spec: ViewSpec, params: ViewParams, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The view of float images on [0, 1] ``(B, 3, S, S)`` with the given parameters, normalised."""
    out = resized_crop(images, params.box, params.flip, spec.size)
    out = color_jitter(out, params.factors, params.order, params.jitter, [r is not None for r in spec.jitter])
    out = grayscale(out, params.grayscale)
    if spec.blur_prob > 0:
        out = gaussian_blur(out, params.sigma, params.blur, spec.blur_kernel)
    if spec.solarize_prob > 0:
        out = solarize(out, params.solarize, spec.solarize_threshold)
    out = (out - torch.tensor(mean, device=out.device).view(1, -1, 1, 1)) / torch.tensor(std, device=out.device).view(1, -1, 1, 1)
    if spec.erase_prob > 0:
        out = erase(out, params.erase_box, params.erase, spec.erase_value)
    return out


class BatchedImageViews(ImageViews):
    """``ImageViews`` computed per batch on the training device (see the module doc); a config
    switches with ``class_path: BatchedImageViews``. ``decode_size`` (default the input's side) is the
    side of the decoded image crops are taken from: larger keeps more detail in small crops at the
    cost of transfer and memory."""

    def __init__(self, *args, decode_size: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.decode_size = decode_size

    def build(self) -> None:
        super().build()
        self.specs = [ViewSpec.of(pipeline) for pipeline in self.pipelines]
        self.side = self.decode_size or self.input_spec.side
        self.decode = T.Compose(
            [T.Resize(self.side, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(self.side), T.PILToTensor()]
        )

    def __call__(self, sample: Image.Image) -> list[Tensor]:
        return [self.decode(sample)]

    def on_device(self, views: list[Tensor]) -> list[Tensor]:
        (decoded,) = views
        images = decoded.float().div_(255)
        return [
            self.apply(images, view, self.sample_params(view, len(images), device=images.device))
            for view in range(len(self.specs))
        ]

    def sample_params(
        self, view: int, batch_size: int, generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> ViewParams:
        """Independent draws per sample with torchvision's distributions for view ``view``."""
        return sample_params(self.specs[view], self.side, batch_size, generator, device)

    def apply(self, images: Tensor, view: int, params: ViewParams) -> Tensor:
        """View ``view`` of float images on [0, 1] ``(B, 3, S, S)`` with the given parameters, normalised."""
        return augment(images, self.specs[view], params, self.mean, self.std)


class BatchedVideoViews(VideoViews):
    """``VideoViews`` computed per batch on the training device (see the module doc); a config
    switches with ``class_path: BatchedVideoViews``. Workers return the clip once, uint8
    ``(T, 3, S, S)`` with ``S = decode_size`` (default the frame size); ``on_device`` makes the
    ``num_views`` views ``(B, 3, T, size, size)``, each with its own parameters per clip."""

    def __init__(self, *args, decode_size: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.decode_size = decode_size

    def build(self) -> None:
        super().build()
        self.spec = ViewSpec.of(self.pipeline)
        self.side = self.decode_size or self.spec.size
        self.decode = v2.Compose([v2.Resize(self.side, antialias=True), v2.CenterCrop(self.side)])

    def __call__(self, clip: Tensor) -> list[Tensor]:
        return [self.decode(tv_tensors.Video(clip)).as_subclass(Tensor)]

    def on_device(self, views: list[Tensor]) -> list[Tensor]:
        (decoded,) = views
        clips = decoded.float().div_(255)
        return [self.apply(clips, self.sample_params(len(clips), device=clips.device)) for _ in range(self.num_views)]

    def sample_params(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> ViewParams:
        """Independent draws per clip with torchvision's distributions (one view's)."""
        return sample_params(self.spec, self.side, batch_size, generator, device)

    def apply(self, clips: Tensor, params: ViewParams) -> Tensor:
        """The view of float clips on [0, 1] ``(B, T, 3, S, S)`` with per-clip parameters, normalised,
        channels first ``(B, 3, T, size, size)``."""
        frames = clips.shape[1]
        out = augment(clips.flatten(0, 1), self.spec, params.repeat_interleave(frames), self.mean, self.std)
        return out.unflatten(0, (-1, frames)).transpose(1, 2).contiguous()
