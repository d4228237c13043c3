"""The base of the video DataModules: the clip geometry, evaluation transform and splits of clips."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from ssl_kit.data.base import SSLDataModule, Splits
from ssl_kit.data.datasets import Transformed
from ssl_kit.data.samples import Samples
from ssl_kit.data.splits import stratified_split
from ssl_kit.data.video.files import ClipSampling, VideoFiles
from ssl_kit.inputs import InputSpec
from ssl_kit.transforms.base import ViewAugmentation
from ssl_kit.transforms.video import VideoEval, VideoTestViews, VideoViews


class VideoDataModule(SSLDataModule):
    """Base of the video DataModules: ``frames_per_clip`` frames ``frame_stride`` apart at
    ``frame_size`` pixels make the input, a clip ``(3, frames, height, width)`` (``input_spec``,
    linked into the model).

    Multi-view testing (VideoMAE's 5 clips x 3 crops): ``test_clips`` clips evenly spaced over each
    test video x ``test_crops`` crops along its long side make a test sample a stack of
    ``test_views`` clips ``(views, 3, frames, height, width)``, which the linear probe, kNN and
    fine-tuning score by the mean of their views' scores; train and validation keep one central clip."""

    default_frame_size = 112

    def __init__(
        self,
        root: str | None = None,
        *args,
        frames_per_clip: int = 8,
        frame_stride: int = 2,
        frame_size: int | None = None,
        views: ViewAugmentation | None = None,
        test_clips: int = 1,
        test_crops: int = 1,
        **kwargs,
    ) -> None:
        if kwargs.get("image_size") is not None:
            raise ValueError("--data.image_size is for images: a clip's frames are --data.frame_size pixels")
        if test_clips < 1 or test_crops < 1:
            raise ValueError(f"--data.test_clips and --data.test_crops must be at least 1, got {test_clips} and {test_crops}")
        self.test_clips, self.test_crops = test_clips, test_crops
        self.test_views = test_clips * test_crops
        self.frames_per_clip = frames_per_clip
        self.frame_stride = frame_stride
        self.frame_size = frame_size or self.default_frame_size
        super().__init__(root, *args, views=views if views is not None else VideoViews(), **kwargs)

    def describe_input(self) -> InputSpec:
        return InputSpec.video(self.frames_per_clip, self.frame_size, self.mean, self.std)

    @property
    def eval_transform(self) -> VideoEval:
        return VideoEval(self.frame_size, self.mean, self.std)

    def labeled_dataset(self, split: str) -> Dataset:
        """As the base's, but the test split's samples are their ``test_views`` views when there are several."""
        labeled = super().labeled_dataset(split)
        if split == "test" and self.test_views > 1:
            return Transformed(labeled.base, VideoTestViews(self.frame_size, self.mean, self.std, self.test_crops))
        return labeled

    @property
    def test_sampling(self) -> ClipSampling:
        """How the test split's clips are cut from a video: the central one, or ``test_clips`` of them for multi-view testing."""
        return "center" if self.test_views == 1 else self.test_clips

    def files(self, samples: Samples, sampling: ClipSampling = "center") -> VideoFiles:
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
            test=None if test is None else self.files(test, self.test_sampling),
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
