from ssl_kit.data.audio import (
    AudioDataModule,
    AudioFolderDataModule,
    ESC50DataModule,
    FSDDDataModule,
    SpeechCommandsDataModule,
    SyntheticAudioDataModule,
)
from ssl_kit.data.base import Splits, SSLDataModule
from ssl_kit.data.video import (
    HMDB51DataModule,
    KineticsDataModule,
    MovingDigitsDataModule,
    UCF101DataModule,
    VideoDataModule,
    VideoFolderDataModule,
)
from ssl_kit.data.image import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    STL10DataModule,
)

__all__ = [
    "Splits",
    "SSLDataModule",
    "DigitsDataModule",
    "MNISTDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "STL10DataModule",
    "ImageFolderDataModule",
    "AudioDataModule",
    "AudioFolderDataModule",
    "FSDDDataModule",
    "SyntheticAudioDataModule",
    "SpeechCommandsDataModule",
    "ESC50DataModule",
    "VideoDataModule",
    "VideoFolderDataModule",
    "MovingDigitsDataModule",
    "UCF101DataModule",
    "HMDB51DataModule",
    "KineticsDataModule",
]
