"""The embedded default: clips of moving digits, generated (seeded), whose label is the motion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_kit.data.base import Splits
from ssl_kit.data.datasets import TensorSamples
from ssl_kit.data.video.base import VideoDataModule

TEST_SPLIT_SEED = 1234
MOTIONS = ("right", "left", "down", "up", "clockwise", "anticlockwise", "zoom in", "zoom out")


class MovingDigitsDataModule(VideoDataModule):
    """Embedded default: clips of a real handwritten digit that moves right / left / down / up,
    turns clockwise / anticlockwise, or zooms in / out; the label is the motion, so any single
    frame is uninformative (the digit, its start position, size, angle and speed are random).
    Digits come from MNIST idx files when ``root`` is given, else from scikit-learn's embedded
    digits. Seeded by ``generator_seed``; 20% is the fixed test set, then ``val_fraction``."""

    num_classes = len(MOTIONS)
    mean = (0.1,) * 3
    std = (0.25,) * 3
    default_frame_size = 32
    default_val_fraction = 0.2

    def __init__(self, root: str | None = None, *args, clips_per_class: int = 100, generator_seed: int = 0, **kwargs) -> None:
        super().__init__(root, *args, **kwargs)
        self.clips_per_class = clips_per_class
        self.generator_seed = generator_seed

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
        """uint8 clips ``(N, T, S, S)`` and their motion labels."""
        rng = np.random.default_rng(self.generator_seed)
        digits = self.digit_images()
        frames, size = self.frames_per_clip, self.frame_size
        labels = np.repeat(np.arange(self.num_classes), self.clips_per_class)
        t = torch.arange(frames, dtype=torch.float32)
        thetas = []
        for label in labels:
            center = torch.tensor(rng.uniform(-0.25, 0.25, 2), dtype=torch.float32)
            extent, angle = rng.uniform(0.45, 0.6), rng.uniform(-0.3, 0.3)  # digit height / canvas, radians
            shift, spin, zoom = rng.uniform(0.04, 0.07), rng.uniform(0.12, 0.2), rng.uniform(0.06, 0.1)
            direction = {0: (1, 0), 1: (-1, 0), 2: (0, 1), 3: (0, -1)}.get(int(label), (0, 0))
            centers = center + shift * t.unsqueeze(1) * torch.tensor(direction, dtype=torch.float32)
            angles = angle + spin * t * {4: 1.0, 5: -1.0}.get(int(label), 0.0)
            scales = extent * (1 + zoom) ** (t * {6: 1.0, 7: -1.0}.get(int(label), 0.0))
            cos, sin = torch.cos(angles) / scales, torch.sin(angles) / scales
            # output point p -> digit coordinates R(-angle) (p - centre) / scale
            rotation = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
            offset = -(rotation @ centers.unsqueeze(-1)).squeeze(-1)
            thetas.append(torch.cat([rotation, offset.unsqueeze(-1)], -1))
        theta = torch.stack(thetas).flatten(0, 1)  # (N * T, 2, 3)
        chosen = torch.from_numpy(rng.integers(0, len(digits), len(labels)))
        sources = digits[chosen].unsqueeze(1).repeat_interleave(frames, 0)  # (N * T, 1, h, w)
        grid = F.affine_grid(theta, [len(theta), 1, size, size], align_corners=False)
        clips = F.grid_sample(sources, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        clips = (clips.clamp(0, 1) * 255).round().to(torch.uint8).view(len(labels), frames, size, size)
        return clips, labels

    def load_splits(self) -> Splits:
        clips, labels = self.generate()
        clips = clips.unsqueeze(2).expand(-1, -1, 3, -1, -1)  # (N, T, 3, S, S), grey in RGB, without a copy
        return self.fixed_test_splits(TensorSamples, clips, labels, TEST_SPLIT_SEED)
