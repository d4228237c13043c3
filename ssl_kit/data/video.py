"""Video DataModules: clips decoded with PyAV (mp4, avi, webm, mkv; FFmpeg is inside its wheel)
or read from folders of extracted frames, sampled to ``frames_per_clip`` frames; samples are uint8
``(T, C, H, W)`` clips, and views / evaluation give float ``(C, T, H, W)``. UCF101, HMDB51 and
Kinetics read the official split files; nothing is downloaded (their archives are .rar files or
YouTube links)."""

from __future__ import annotations

import csv
import io
import logging
import re
import tarfile
from pathlib import Path
from typing import IO, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ssl_kit.data.base import SSLDataModule, Splits
from ssl_kit.data.cache import DecodedCache
from ssl_kit.data.datasets import (
    IMAGE_EXTENSIONS, LabeledFiles, Samples, ShardMember, SkippedFiles, Source, TensorSamples, UnreadableFileError, open_sample,
)  # fmt: skip
from ssl_kit.data.sources import FRAMES_SUFFIX, ClassFolders, is_sharded
from ssl_kit.data.splits import stratified_split
from ssl_kit.transforms.base import ViewAugmentation
from ssl_kit.transforms.video import VideoEval, VideoViews

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")
TEST_SPLIT_SEED = 1234


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
        self, samples: Samples, frames_per_clip: int, stride: int, sampling: Literal["random", "center"],
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
        views: ViewAugmentation | None = None,
        **kwargs,
    ) -> None:
        self.frames_per_clip = frames_per_clip
        self.frame_stride = frame_stride
        size = frame_size or self.default_frame_size
        super().__init__(root, *args, image_size=(frames_per_clip, size, size), views=views if views is not None else VideoViews(), **kwargs)

    @property
    def eval_transform(self) -> VideoEval:
        return VideoEval(self.image_size[-1], self.mean, self.std)

    def files(self, samples: Samples, sampling: Literal["random", "center"] = "center") -> VideoFiles:
        return VideoFiles(samples, self.frames_per_clip, self.frame_stride, sampling, self.skipped_files, self.decoded_cache)

    def sample_splits(
        self, train: Samples, val: Samples | None, test: Samples | None, groups: list[str] | None = None,
    ) -> Splits:  # fmt: skip
        """``Splits`` of sample lists: random-start clips for pretraining, central ones for
        evaluation. Without ``val``, a seeded ``val_fraction`` of every class of ``train`` is held
        out, whole ``groups`` at a time when given (clips cut from one source video stay together,
        so validation never sees a scene it trained on), else one sample at a time in list order (so
        a folder and its shards hold out the same videos)."""
        if val is None:
            train, val = self.holdout_groups(train, groups if groups is not None else list(range(len(train))))
        return Splits(
            pretrain=self.files(train, "random"),
            train=self.files(train, "center"),
            val=self.files(val, "center"),
            test=None if test is None else self.files(test, "center"),
        )

    def holdout_groups(self, samples: Samples, groups: list[str] | list[int]) -> tuple[Samples, Samples]:
        """(kept, held) samples: ``stratified_split`` over the groups (each has its first sample's label)."""
        labels = np.array([label for _, label in samples])
        _, first, member = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
        _, held_groups = stratified_split(labels[first], self.val_fraction, self.seed)
        if len(held_groups) == 0:
            raise ValueError(f"val_fraction={self.val_fraction} leaves no validation samples")
        held = np.isin(member, held_groups)
        return [s for s, h in zip(samples, held) if not h], [s for s, h in zip(samples, held) if h]


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


class VideoFolderDataModule(ClassFolders, VideoDataModule):
    """Your own videos: ``root/train/<class>/<video file or folder of frames>`` and, optionally,
    ``root/val/...`` and ``root/test/...``. Training clips start at a random frame, evaluation
    clips in the middle. Without ``val`` a seeded stratified ``val_fraction`` of train is held out.
    ``root`` may also be shards of such a folder (``python -m ssl_kit.data.shards``)."""

    folder_kind = "VideoFolder"
    modality = "video"
    list_split = staticmethod(list_videos)


KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
KINETICS_FOLDERS = {"train": ("train",), "validate": ("val", "validate"), "test": ("test",)}


class KineticsDataModule(VideoFolderDataModule):
    """Kinetics-400/600/700: the official ``root/annotations/{train,validate,test}.csv`` (columns
    label, youtube_id, time_start, time_end, ...); the clip of a row is
    ``<youtube_id>_<time_start:06d>_<time_end:06d>.mp4`` (any video extension) anywhere under
    ``root/train``, ``root/val`` (or ``validate``) or ``root/test``: in ``<label>/`` folders or
    flat, as the common downloaders write them. Rows whose clip is absent (Kinetics always has dead
    YouTube links) are skipped and counted in one warning per split. A val or test CSV without
    labels (withheld in some releases) gives no such split. Classes are the sorted train labels;
    without validate.csv a seeded stratified ``val_fraction`` of train is held out. Without
    annotations: class folders ``root/train/<class>/*`` (or their shards) exactly as ``VideoFolderDataModule``."""

    def _csv(self, split: str) -> Path:
        return Path(self.root).expanduser() / "annotations" / f"{split}.csv"

    def read_classes(self) -> list[str]:
        if self._csv("train").is_file():
            return sorted({row["label"] for row in self._rows("train")})
        train = Path(self.root).expanduser() / "train"
        if not train.is_dir() and not is_sharded(self.root):
            raise FileNotFoundError(
                f"Kinetics not found in {self.root}: expected the official annotations {self._csv('train')} "
                f"(clips under {train}/) or class folders {train}/<class>/*"
            )
        return super().read_classes()

    def _rows(self, split: str) -> list[dict[str, str]] | None:
        path = self._csv(split)
        if not path.is_file():
            return None
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in KINETICS_COLUMNS if column not in (reader.fieldnames or ())]
            if missing == ["label"] and split != "train":
                log.warning("%s has no labels (withheld in this release): no %s split", path, split)
                return None
            if missing:
                raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}")
            return list(reader)

    def _csv_samples(self, split: str) -> list[tuple[str, int]] | None:
        """The clips of ``<split>.csv`` found on disk; absent ones are skipped and counted."""
        rows, path = self._rows(split), self._csv(split)
        if rows is None:
            return None
        root = Path(self.root).expanduser()
        folders = [root / name for name in KINETICS_FOLDERS[split]]
        on_disk = {
            file.stem: file
            for folder in folders
            if folder.is_dir()
            for file in folder.rglob("*")
            if file.suffix.lower() in VIDEO_EXTENSIONS
        }
        index = {name: i for i, name in enumerate(self.classes)}
        samples = []
        for row in rows:
            if row["label"] not in index:
                raise ValueError(f"{path}: label {row['label']!r} is not in {self._csv('train')}")
            clip = on_disk.get(f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}")
            if clip is not None:
                samples.append((str(clip), index[row["label"]]))
        where = " or ".join(f"{folder}/" for folder in folders)
        if not samples:
            raise FileNotFoundError(
                f"none of the {len(rows)} clips of {path} is under {where} "
                "(expected <label>/<youtube_id>_<time_start:06d>_<time_end:06d>.mp4)"
            )
        if len(samples) < len(rows):
            absent = len(rows) - len(samples)
            log.warning("Kinetics %s: %d of the %d clips of %s are absent under %s; skipped", split, absent, len(rows), path, where)
        return samples

    def load_splits(self) -> Splits:
        if not self._csv("train").is_file():
            return super().load_splits()
        return self.sample_splits(*(self._csv_samples(split) for split in ("train", "validate", "test")))


class OfficialSplitsDataModule(VideoDataModule):
    """The shared code of UCF101 and HMDB51: classes and the ``fold`` (1-3) train / test lists
    from the official split files in ``root/<split_folder>``, videos ``<class>/<file>`` under
    ``videos`` (relative to root, or absolute; None: the first of ``video_folders`` that exists,
    else root). Validation is a seeded stratified ``val_fraction`` of the official train list, in
    whole ``group``s; test is the official test list. Nothing is downloaded: the archives are .rar
    files (unrar, 7z or bsdtar extract them)."""

    dataset: str
    homepage: str
    split_folder: str
    video_folders: tuple[str, ...] = ()

    def __init__(self, root: str, *args, fold: int = 1, videos: str | None = None, **kwargs) -> None:
        super().__init__(root, *args, **kwargs)
        if fold not in (1, 2, 3):
            raise ValueError(f"{self.dataset} fold must be 1-3, got {fold}")
        self.fold = fold
        base = Path(root).expanduser()
        default = next((base / name for name in self.video_folders if (base / name).is_dir()), base)
        self.video_dir = default if videos is None else base / videos
        self.classes = self.read_classes()
        self.num_classes = len(self.classes)

    def split_file(self, name: str) -> Path:
        """A file (or, for ``""``, the folder) of the official splits; absent, an error saying where to get it."""
        path = Path(self.root).expanduser() / self.split_folder / name
        if not path.exists():
            raise FileNotFoundError(
                f"{self.dataset} split file not found: {path}. Download the videos and the official train/test splits from "
                f"{self.homepage} and extract both into {self.root} (the archives are .rar: unrar, 7z or bsdtar open them)."
            )
        return path

    def rows(self, name: str) -> list[list[str]]:
        """The whitespace-separated fields of the non-empty lines of a split file."""
        return [line.split() for line in self.split_file(name).read_text().splitlines() if line.strip()]

    def read_classes(self) -> list[str]:
        """Class names in label order."""
        raise NotImplementedError

    def official_lists(self) -> tuple[list[str], list[str]]:
        """``<class>/<file>`` of the train and test videos of ``fold``."""
        raise NotImplementedError

    def group(self, video: str) -> str:
        """Videos of one group are held out together (default: each video is its own group)."""
        return video

    def locate(self, videos: list[str]) -> list[tuple[str, int]]:
        """Samples of listed ``<class>/<file>`` videos; absent ones are an error naming them."""
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = [video for video in videos if video.split("/")[0] not in index]
        if unknown:
            raise ValueError(f"{self.dataset} fold {self.fold} lists {unknown[0]}, whose class is not one of the {len(index)} classes")
        missing = [str(self.video_dir / video) for video in videos if not (self.video_dir / video).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} video(s) of the {self.dataset} fold-{self.fold} lists not found, first {missing[0]}: expected "
                f"{self.video_dir}/<class>/<video> (videos from {self.homepage}; --data.videos names another folder)"
            )
        return [(str(self.video_dir / video), index[video.split("/")[0]]) for video in videos]

    def load_splits(self) -> Splits:
        train, test = self.official_lists()
        return self.sample_splits(self.locate(train), None, self.locate(test), groups=[self.group(video) for video in train])


UCF101_GROUP = re.compile(r"_(g\d+)_c\d+\.\w+$")


class UCF101DataModule(OfficialSplitsDataModule):
    """UCF101: videos ``root/UCF-101/<Class>/v_<Class>_gXX_cYY.avi`` (as UCF101.rar extracts; or
    ``root/<Class>/...``, or ``videos``) and ``root/ucfTrainTestlist/`` (classInd.txt,
    trainlist0{fold}.txt, testlist0{fold}.txt). 101 classes. The clips of one group gXX are cut
    from one long video, so validation holds out whole groups of each class: otherwise it would
    score near-duplicates of training clips."""

    dataset = "UCF101"
    homepage = "https://www.crcv.ucf.edu/data/UCF101.php"
    split_folder = "ucfTrainTestlist"
    video_folders = ("UCF-101",)

    def read_classes(self) -> list[str]:
        return [name for _, name in sorted((int(number), name) for number, name in self.rows("classInd.txt"))]

    def official_lists(self) -> tuple[list[str], list[str]]:
        train, test = ([row[0] for row in self.rows(f"{part}list0{self.fold}.txt")] for part in ("train", "test"))
        return train, test

    def group(self, video: str) -> str:
        match = UCF101_GROUP.search(video)
        return video if match is None else f"{video.split('/')[0]}/{match[1]}"


class HMDB51DataModule(OfficialSplitsDataModule):
    """HMDB51: videos ``root/<class>/<name>.avi`` (or under ``videos``) and
    ``root/testTrainMulti_7030_splits/<class>_test_split{fold}.txt`` with lines ``<name> <id>``:
    1 train, 2 test, 0 unused in that fold. 51 classes (those with a split file)."""

    dataset = "HMDB51"
    homepage = "https://serre-lab.clps.brown.edu/resource/hmdb-a-large-human-motion-database/"
    split_folder = "testTrainMulti_7030_splits"

    def _suffix(self) -> str:
        return f"_test_split{self.fold}.txt"

    def read_classes(self) -> list[str]:
        folder = self.split_file("")
        classes = sorted(path.name[: -len(self._suffix())] for path in folder.glob(f"*{self._suffix()}"))
        if not classes:
            raise FileNotFoundError(f"no HMDB51 split files <class>{self._suffix()} in {folder} (from {self.homepage})")
        return classes

    def official_lists(self) -> tuple[list[str], list[str]]:
        parts: dict[str, list[str]] = {"1": [], "2": [], "0": []}  # train, test, unused
        for name in self.classes:
            split_file = f"{name}{self._suffix()}"
            for fields in self.rows(split_file):
                if len(fields) != 2 or fields[1] not in parts:
                    raise ValueError(f"{self.split_file(split_file)}: expected '<video> <0|1|2>' lines, got {' '.join(fields)!r}")
                parts[fields[1]].append(f"{name}/{fields[0]}")
        return parts["1"], parts["2"]


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
        return self.fixed_test_splits(TensorSamples, clips, labels, TEST_SPLIT_SEED)

