"""Reading videos: clips decoded with PyAV (mp4, avi, webm, mkv; FFmpeg is inside its wheel) or
read from folders of extracted frames, sampled to ``frames_per_clip`` frames as uint8 ``(T, C, H, W)``."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import IO, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ssl_kit.data.cache import DecodedCache
from ssl_kit.data.datasets import IMAGE_EXTENSIONS, LabeledFiles, SkippedFiles
from ssl_kit.data.samples import Samples, ShardMember, Source, UnreadableFileError, open_sample
from ssl_kit.data.sources import FRAMES_SUFFIX


VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")


def frame_images(path: Source | Path) -> list[str | IO[bytes]] | None:
    """The frame images of a frame-folder video, sorted by name: the files of a folder, or the
    members of a shard member that is a tar of them (``*.frames.tar``); None for a video file."""
    if isinstance(path, ShardMember):
        if not path.member.endswith(FRAMES_SUFFIX):
            return None
        with tarfile.open(fileobj=open_sample(path)) as frames:
            members = sorted((m for m in frames.getmembers() if m.isfile()), key=lambda m: m.name)
            return [io.BytesIO(frames.extractfile(m).read()) for m in members if Path(m.name).suffix.lower() in IMAGE_EXTENSIONS]
    path = Path(path)
    return sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if path.is_dir() else None


def read_video(path: Source | Path) -> Tensor:
    """All frames of a video file, or of a folder of frame images (sorted by name), as uint8
    ``(T, 3, H, W)``; either may be a shard member. An unreadable or frameless clip raises
    ``UnreadableFileError`` naming it."""
    try:
        images = frame_images(path)
        if images is not None:
            frames = [np.asarray(Image.open(image).convert("RGB")) for image in images]
        else:
            import av

            with av.open(open_sample(path)) as container:
                frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except Exception as error:  # PyAV raises FFmpeg errors of many kinds; PIL and tarfile their own
        raise UnreadableFileError(f"cannot read video {path}: {error}") from error
    if not frames:
        raise UnreadableFileError(f"video {path} has no frames")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


#: How a clip is cut from a video: at a random or the central offset, or N clips (multi-view testing).
ClipSampling = Literal["random", "center"] | int


def clip_indices(num_frames: int, frames_per_clip: int, stride: int, sampling: ClipSampling) -> np.ndarray:
    """Frame indices of one clip: ``frames_per_clip`` frames ``stride`` apart, starting at a
    random or the central offset; or, for an int N, of N clips ``(N, frames_per_clip)`` whose
    starts are evenly spaced from the first frame to the last start (VideoMAE's multi-view test;
    N = 1: the central clip). A video shorter than the span repeats its last frame (the
    documented rule for short clips)."""
    span = (frames_per_clip - 1) * stride + 1
    room = max(0, num_frames - span)
    if sampling == "random":
        start = int(np.random.randint(0, room + 1))
    elif sampling == "center":
        start = room // 2
    else:
        starts = np.array([room // 2]) if sampling == 1 else (np.arange(sampling) * room / (sampling - 1)).astype(np.int64)
        start = starts[:, None]
    return np.minimum(start + np.arange(frames_per_clip) * stride, num_frames - 1)


class VideoFiles(LabeledFiles):
    """One clip per video file or frame folder per epoch (see ``read_video`` and ``clip_indices``);
    ``sampling`` N: a stack of N clips ``(N, T, C, H, W)`` (multi-view testing)."""

    def __init__(
        self, samples: Samples, frames_per_clip: int, stride: int, sampling: ClipSampling,
        skipped: SkippedFiles | None = None, cache: DecodedCache | None = None,
    ) -> None:  # fmt: skip
        super().__init__(samples, skipped, cache)
        self.frames_per_clip, self.stride, self.sampling = frames_per_clip, stride, sampling

    def variant(self) -> str:
        return "video"  # every frame is kept: clips are cut from the cached frames

    def decode(self, path: Source) -> np.ndarray:
        return read_video(path).numpy()

    def finish(self, frames: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(frames[clip_indices(len(frames), self.frames_per_clip, self.stride, self.sampling)]))


def list_videos(directory: Path, classes: list[str]) -> list[tuple[str, int]] | None:
    """The videos (files and frame folders) of one split folder ``directory/<class>/`` (None: no such folder)."""
    if not directory.is_dir():
        return None
    samples = []
    for label, cls in enumerate(classes):
        folder = directory / cls
        for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
            if (entry.is_file() and entry.suffix.lower() in VIDEO_EXTENSIONS) or entry.is_dir():
                samples.append((str(entry), label))
    if not samples:
        raise FileNotFoundError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) or frame folders under {directory}/<class>/")
    return samples
