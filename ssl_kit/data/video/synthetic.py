"""The embedded default: clips of moving digits, generated (seeded), whose label is the motion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ssl_kit.data.base import Splits
from ssl_kit.data.datasets import TensorSamples, Transformed
from ssl_kit.data.video.base import VideoDataModule
from ssl_kit.data.video.files import ClipSampling, clip_indices

TEST_SPLIT_SEED = 1234
MOTIONS = ("right", "left", "down", "up", "clockwise", "anticlockwise", "zoom in", "zoom out")


def warp(images: Tensor, theta: Tensor, height: int, width: int) -> Tensor:
    """``F.grid_sample(images, F.affine_grid(theta, (N, 1, height, width)))`` (bilinear, zero
    padding, ``align_corners=False``) by elementwise arithmetic and indexing alone. torch's own pair
    rounds differently by machine (``affine_grid`` is a BLAS matrix product, ``grid_sample`` has
    per-instruction-set kernels: MKL on an AVX-512 Intel CPU moved 3 of the default data's 6.5
    million pixels by a grey level), so the embedded data would not be the same bytes everywhere.
    ``images``: (N, h, w); ``theta``: (N, 2, 3) -> (N, height, width)."""
    rows, cols = images.shape[-2:]
    xs = (torch.arange(width, dtype=theta.dtype) * 2 + 1) / width - 1  # output pixel centres in [-1, 1]
    ys = ((torch.arange(height, dtype=theta.dtype) * 2 + 1) / height - 1).unsqueeze(-1)
    t = theta.flatten(1)[:, :, None, None]  # (N, 6, 1, 1)
    x = ((xs * t[:, 0] + ys * t[:, 1] + t[:, 2] + 1) * cols - 1) / 2  # source pixel coordinates
    y = ((xs * t[:, 3] + ys * t[:, 4] + t[:, 5] + 1) * rows - 1) / 2
    x0, y0 = x.floor(), y.floor()
    flat = images.flatten(1)
    out = torch.zeros_like(x)
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        cx, cy = x0 + dx, y0 + dy
        weight = (1 - (x - cx).abs()) * (1 - (y - cy).abs())
        inside = (cx >= 0) & (cx < cols) & (cy >= 0) & (cy < rows)
        index = (cy.clamp(0, rows - 1) * cols + cx.clamp(0, cols - 1)).long().flatten(1)
        out = out + torch.where(inside, weight * flat.gather(1, index).view_as(x), 0.0)
    return out


class MovingDigitsDataModule(VideoDataModule):
    """Embedded default: clips of a real handwritten digit that moves right / left / down / up,
    turns clockwise / anticlockwise, or zooms in / out; the label is the motion, so any single
    frame is uninformative (the digit, its start position, size, angle and speed are random).
    Digits come from MNIST idx files when ``root`` is given, else from scikit-learn's embedded
    digits. Seeded by ``generator_seed``; 20% is the fixed test set, then ``val_fraction``.

    A video is one clip, ``frames_per_clip`` frames of ``frame_size`` pixels (``frame_stride``
    unused), unless ``video_frames`` asks for longer videos: the same motion filmed at a higher
    frame rate (the digit travels as far as over one clip, so it stays in the frame), from which
    clips of ``frames_per_clip`` frames ``frame_stride`` apart are cut as from video files (a
    random one per epoch for pretraining, the central one for train and val, ``test_clips`` evenly
    spaced ones for test). ``frame_width`` makes frames wider than tall (the digit's start spread over the
    width), cut to squares by the views and evaluation (``test_crops`` crops along the width)."""

    num_classes = len(MOTIONS)
    mean = (0.1,) * 3
    std = (0.25,) * 3
    default_frame_size = 32
    default_val_fraction = 0.2

    def __init__(
        self, root: str | None = None, *args, clips_per_class: int = 100, generator_seed: int = 0,
        video_frames: int | None = None, frame_width: int | None = None, **kwargs,
    ) -> None:  # fmt: skip
        super().__init__(root, *args, **kwargs)
        self.clips_per_class = clips_per_class
        self.generator_seed = generator_seed
        self.video_frames = video_frames
        self.frame_width = frame_width or self.frame_size
        span = (self.frames_per_clip - 1) * self.frame_stride + 1
        if video_frames is not None and video_frames < span:
            raise ValueError(f"--data.video_frames {video_frames} is shorter than one clip ({self.frames_per_clip} frames {self.frame_stride} apart span {span})")
        distinct_clips = 1 if video_frames is None else video_frames - span + 1
        if self.test_clips > distinct_clips:
            raise ValueError(
                f"--data.test_clips {self.test_clips}: the moving digits' videos hold {distinct_clips} different clip(s); "
                f"set --data.video_frames to at least {span + self.test_clips - 1} ({self.frames_per_clip} frames {self.frame_stride} apart span {span})"
            )

    def digit_images(self) -> Tensor:
        if self.root is None:
            from sklearn.datasets import load_digits

            return torch.from_numpy(load_digits().images / 16.0).float()
        from ssl_kit.data.image import read_idx

        files = sorted(Path(self.root).expanduser().glob("train-images-idx3-ubyte*"))
        if not files:
            raise FileNotFoundError(f"no MNIST train-images-idx3-ubyte[.gz] in {self.root}")
        return torch.from_numpy(read_idx(files[0])[:10000].astype(np.float32) / 255.0)

    def generate(self) -> tuple[Tensor, np.ndarray]:
        """uint8 videos ``(N, T, H, W)`` and their motion labels; positions are in frame heights."""
        rng = np.random.default_rng(self.generator_seed)
        digits = self.digit_images()
        frames, height, width = self.video_frames or self.frames_per_clip, self.frame_size, self.frame_width
        aspect = width / height
        to_heights = torch.tensor([aspect, 1.0])  # affine_grid's x spans the width: in frame heights, x * aspect
        labels = np.repeat(np.arange(self.num_classes), self.clips_per_class)
        t = torch.linspace(0, self.frames_per_clip - 1, frames)  # one clip's motion over the whole video
        thetas = []
        for label in labels:
            center = torch.tensor(rng.uniform(-0.25, 0.25, 2) * (aspect, 1.0), dtype=torch.float32)
            extent, angle = rng.uniform(0.45, 0.6), rng.uniform(-0.3, 0.3)  # digit height / canvas, radians
            shift, spin, zoom = rng.uniform(0.04, 0.07), rng.uniform(0.12, 0.2), rng.uniform(0.06, 0.1)
            direction = {0: (1, 0), 1: (-1, 0), 2: (0, 1), 3: (0, -1)}.get(int(label), (0, 0))
            centers = center + shift * t.unsqueeze(1) * torch.tensor(direction, dtype=torch.float32)
            angles = angle + spin * t * {4: 1.0, 5: -1.0}.get(int(label), 0.0)
            scales = extent * (1 + zoom) ** (t * {6: 1.0, 7: -1.0}.get(int(label), 0.0))
            cos, sin = torch.cos(angles) / scales, torch.sin(angles) / scales
            # output point p (in frame heights) -> digit coordinates R(-angle) (p - centre) / scale
            rotation = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
            offset = -(rotation * centers.unsqueeze(-2)).sum(-1)  # R c, without a BLAS call
            thetas.append(torch.cat([rotation * to_heights, offset.unsqueeze(-1)], -1))
        theta = torch.stack(thetas).flatten(0, 1)  # (N * T, 2, 3)
        chosen = torch.from_numpy(rng.integers(0, len(digits), len(labels)))
        videos = warp(digits[chosen].repeat_interleave(frames, 0), theta, height, width)  # (N * T, H, W)
        videos = (videos.clamp(0, 1) * 255).round().to(torch.uint8).view(len(labels), frames, height, width)
        return videos, labels

    def load_splits(self) -> Splits:
        videos, labels = self.generate()
        videos = videos.unsqueeze(2).expand(-1, -1, 3, -1, -1)  # (N, T, 3, H, W), grey in RGB, without a copy
        splits = self.fixed_test_splits(TensorSamples, videos, labels, TEST_SPLIT_SEED)
        if self.video_frames is None:
            return splits  # a video is one clip

        def clips(dataset: Dataset, sampling: ClipSampling) -> Transformed:
            return Transformed(dataset, CutClips(self.frames_per_clip, self.frame_stride, sampling))

        return Splits(
            pretrain=clips(splits.train, "random"),
            train=clips(splits.train, "center"),
            val=clips(splits.val, "center"),
            test=clips(splits.test, self.test_sampling),
        )


class CutClips:
    """A video ``(T, C, H, W)`` -> its clip at ``clip_indices`` (for N clips, a stack ``(N, frames, C, H, W)``): ``VideoFiles``' cut, on tensors."""

    def __init__(self, frames_per_clip: int, stride: int, sampling: ClipSampling) -> None:
        self.frames_per_clip, self.stride, self.sampling = frames_per_clip, stride, sampling

    def __call__(self, video: Tensor) -> Tensor:
        return video[torch.from_numpy(clip_indices(len(video), self.frames_per_clip, self.stride, self.sampling))]
