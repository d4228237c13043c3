"""Video views: the same random crop, flip and colour jitter for every frame of a clip
(torchvision's v2 transforms on a ``Video`` tensor draw one set of parameters per clip).
Clips come in as uint8 ``(T, C, H, W)`` and leave as normalised float ``(C, T, H, W)``."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from ssl_kit.transforms.base import ViewAugmentation


def _finish(mean, std) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def to_channels_first(clip: Tensor) -> Tensor:
    """``(T, C, H, W)`` -> ``(C, T, H, W)``, the layout of 3-D convolutions."""
    return clip.permute(1, 0, 2, 3).contiguous()


class VideoEval:
    """Resize the short side, centre-crop, normalise; the same for every frame."""

    def __init__(self, size: int, mean, std) -> None:
        self.transform = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), *_finish(mean, std)])

    def __call__(self, clip: Tensor) -> Tensor:
        return to_channels_first(self.transform(tv_tensors.Video(clip)).as_subclass(Tensor))


class VideoTestViews:
    """Multi-view testing (VideoMAE): each clip of a stack ``(clips, T, C, H, W)`` (or one clip
    ``(T, C, H, W)``) resized on its short side to ``size`` and cut into ``crops`` squares evenly
    spaced along its long side (one crop: the centre, exactly ``VideoEval``'s), normalised:
    ``(clips * crops, C, T, size, size)``, the crops of the first clip first."""

    def __init__(self, size: int, mean, std, crops: int) -> None:
        self.size, self.crops = size, crops
        self.resize = v2.Resize(size, antialias=True)
        self.finish = v2.Compose(_finish(mean, std))

    def __call__(self, clips: Tensor) -> Tensor:
        views = []
        for clip in clips if clips.ndim == 5 else clips.unsqueeze(0):
            frames = self.resize(tv_tensors.Video(clip)).as_subclass(Tensor)
            height, width = frames.shape[-2:]
            tops = crop_starts(height, self.size, self.crops if height > width else 1)
            lefts = crop_starts(width, self.size, 1 if height > width else self.crops)
            for top, left in itertools.product(tops, lefts):  # one of them has one start
                crop = frames[..., top : top + self.size, left : left + self.size]
                views.append(to_channels_first(self.finish(tv_tensors.Video(crop)).as_subclass(Tensor)))
        return torch.stack(views)


def crop_starts(length: int, size: int, crops: int) -> list[int]:
    """Starts of ``crops`` windows of ``size`` evenly spaced over ``length`` (one: centred, as torchvision's ``CenterCrop``)."""
    if crops == 1:
        return [int(round((length - size) / 2.0))]
    return [int(i * (length - size) / (crops - 1)) for i in range(crops)]


class VideoViews(ViewAugmentation):
    """``num_views`` augmented views of a clip, each consistent across its frames: random resized
    crop, horizontal flip (``flip_prob``; 0 where direction is the label, as in the embedded
    moving digits), colour jitter with probability ``jitter_prob``, grayscale, and with
    ``erase_prob`` one random rectangle erased in every frame (Cutout; for the strong view of
    self-training pairs, see ``PairedViews``)."""

    def __init__(
        self,
        num_views: int = 2,
        crop_scale: tuple[float, float] = (0.3, 1.0),
        flip_prob: float = 0.5,
        jitter_prob: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_prob: float = 0.2,
        erase_prob: float = 0.0,
        erase_scale: tuple[float, float] = (0.02, 0.25),
    ) -> None:
        self.num_views = num_views
        self.crop_scale = tuple(crop_scale)
        self.flip_prob = flip_prob
        self.jitter_prob = jitter_prob
        self.jitter = (brightness, contrast, saturation, hue)
        self.grayscale_prob = grayscale_prob
        self.erase_prob = erase_prob
        self.erase_scale = tuple(erase_scale)

    def build(self) -> None:
        size = self.input_spec.height
        self.pipeline = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=self.crop_scale, antialias=True),
                v2.RandomHorizontalFlip(self.flip_prob),
                v2.RandomApply([v2.ColorJitter(*self.jitter)], p=self.jitter_prob),
                v2.RandomGrayscale(self.grayscale_prob),
                *_finish(self.mean, self.std),
                v2.RandomErasing(self.erase_prob, scale=self.erase_scale, value=0),
            ]
        )

    def __call__(self, clip: Tensor) -> list[Tensor]:
        video = tv_tensors.Video(clip)
        return [to_channels_first(self.pipeline(video).as_subclass(Tensor)) for _ in range(self.num_views)]
