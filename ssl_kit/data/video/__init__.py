"""Video DataModules: samples are uint8 ``(T, C, H, W)`` clips, and views / evaluation give float
``(C, T, H, W)``. ``files``: decoding and listing; ``base``: what every video DataModule shares;
``folders``: your own class folders and Kinetics; ``official``: UCF101 and HMDB51 from their
split files; ``synthetic``: the embedded moving digits."""

from ssl_kit.data.video.base import VideoDataModule
from ssl_kit.data.video.files import VIDEO_EXTENSIONS, VideoFiles, clip_indices, list_videos, read_video
from ssl_kit.data.video.folders import KineticsDataModule, VideoFolderDataModule
from ssl_kit.data.video.official import HMDB51DataModule, OfficialSplitsDataModule, UCF101DataModule
from ssl_kit.data.video.synthetic import MOTIONS, MovingDigitsDataModule

__all__ = [
    "VIDEO_EXTENSIONS", "VideoFiles", "clip_indices", "list_videos", "read_video", "VideoDataModule",
    "KineticsDataModule", "VideoFolderDataModule", "HMDB51DataModule", "OfficialSplitsDataModule", "UCF101DataModule",
    "MOTIONS", "MovingDigitsDataModule",
]  # fmt: skip
