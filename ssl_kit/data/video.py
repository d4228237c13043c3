"""Video DataModules: clips decoded with PyAV (mp4, avi, webm, mkv; FFmpeg is inside its wheel)
or read from folders of extracted frames, sampled to ``frames_per_clip`` frames; samples are uint8
``(T, C, H, W)`` clips, and views / evaluation give float ``(C, T, H, W)``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ssl_kit.data.base import SSLDataModule, Splits
from ssl_kit.data.datasets import IMAGE_EXTENSIONS, LabeledFiles, TensorSamples, Transformed, UnreadableFileError, class_names
from ssl_kit.data.splits import stratified_split
from ssl_kit.transforms.video import VideoEval, VideoViews

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")
TEST_SPLIT_SEED = 1234


def read_video(path: str | Path) -> Tensor:
    """All frames of a video file, or of a folder of frame images (sorted by name), as uint8
    ``(T, 3, H, W)``. An unreadable or frameless clip raises ``UnreadableFileError`` naming it."""
    path = Path(path)
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            frames = [np.asarray(Image.open(p).convert("RGB")) for p in files]
        else:
            import av

            with av.open(str(path)) as container:
                frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except Exception as error:  # PyAV raises FFmpeg errors of many kinds; PIL its own
        raise UnreadableFileError(f"cannot read video {path}: {error}") from error
    if not frames:
        raise UnreadableFileError(f"video {path} has no frames")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def clip_indices(num_frames: int, frames_per_clip: int, stride: int, sampling: Literal["random", "center"]) -> np.ndarray:
    """Frame indices of one clip: ``frames_per_clip`` frames ``stride`` apart, starting at a
    random or the central offset. A video shorter than the span repeats its last frame (the
    documented rule for short clips)."""
    span = (frames_per_clip - 1) * stride + 1
    room = max(0, num_frames - span)
    start = int(np.random.randint(0, room + 1)) if sampling == "random" else room // 2
    return np.minimum(start + np.arange(frames_per_clip) * stride, num_frames - 1)


class VideoFiles(LabeledFiles):
    """One clip per video file or frame folder per epoch (see ``read_video`` and ``clip_indices``)."""

    def __init__(
        self, samples: list[tuple[str, int]], frames_per_clip: int, stride: int, sampling: Literal["random", "center"],
        skip_bad_files: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(samples, skip_bad_files)
        self.frames_per_clip, self.stride, self.sampling = frames_per_clip, stride, sampling

    def read(self, path: str) -> Tensor:
        frames = read_video(path)
        return frames[clip_indices(len(frames), self.frames_per_clip, self.stride, self.sampling)]


class VideoDataModule(SSLDataModule):
    """Base of the video DataModules: ``frames_per_clip`` frames ``frame_stride`` apart at
    ``frame_size`` pixels make the sample "image" ``(frames, height, width)`` (linked into the model)."""

    default_frame_size = 112

    def __init__(
        self,
        root: str | None = None,
        *args,
        frames_per_clip: int = 8,
        frame_stride: int = 2,
        frame_size: int | None = None,
        views: VideoViews | None = None,
        **kwargs,
    ) -> None:
        self.frames_per_clip = frames_per_clip
        self.frame_stride = frame_stride
        size = frame_size or self.default_frame_size
        super().__init__(root, *args, image_size=(frames_per_clip, size, size), views=views if views is not None else VideoViews(), **kwargs)

    @property
    def eval_transform(self) -> VideoEval:
        return VideoEval(self.image_size[-1], self.mean, self.std)

    def files(self, samples: list[tuple[str, int]], sampling: Literal["random", "center"]) -> VideoFiles:
        return VideoFiles(samples, self.frames_per_clip, self.frame_stride, sampling, self.skip_bad_files)


class VideoFolderDataModule(VideoDataModule):
    """Your own videos: ``root/train/<class>/<video file or folder of frames>`` and, optionally,
    ``root/val/...`` and ``root/test/...``. Training clips start at a random frame, evaluation
    clips in the middle. Without ``val`` a seeded stratified ``val_fraction`` of train is held out."""

    def __init__(self, root: str, *args, **kwargs) -> None:
        super().__init__(root, *args, **kwargs)
        self.classes = class_names(root, "VideoFolder")
        self.num_classes = len(self.classes)

    def _samples(self, name: str) -> list[tuple[str, int]] | None:
        directory = Path(self.root).expanduser() / name
        if not directory.is_dir():
            return None
        samples = []
        for label, cls in enumerate(self.classes):
            folder = directory / cls
            for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
                if (entry.is_file() and entry.suffix.lower() in VIDEO_EXTENSIONS) or entry.is_dir():
                    samples.append((str(entry), label))
        if not samples:
            raise FileNotFoundError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) or frame folders under {directory}/<class>/")
        return samples

    def load_splits(self) -> Splits:
        train = self._samples("train")
        val, test = self._samples("val"), self._samples("test")
        if val is None:
            kept, held = stratified_split(np.array([label for _, label in train]), self.val_fraction, self.seed)
            train, val = [train[i] for i in kept], [train[i] for i in held]
        pretrain = self.files(train, "random")
        return Splits(
            pretrain=pretrain,
            train=self.files(train, "center"),
            val=self.files(val, "center"),
            test=None if test is None else self.files(test, "center"),
        )


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
        frames, size = self.frames_per_clip, self.image_size[-1]
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
        rest, test = stratified_split(labels, 0.2, TEST_SPLIT_SEED)
        train, val = self.holdout_val(TensorSamples(clips[rest], labels[rest]))
        return Splits(pretrain=train, train=train, val=val, test=Transformed(TensorSamples(clips, labels), indices=test))

