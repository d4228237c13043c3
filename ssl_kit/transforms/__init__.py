from ssl_kit.transforms.audio import AudioViews, LogMel
from ssl_kit.transforms.base import PairedViews, ViewAugmentation
from ssl_kit.transforms.batched import BatchedImageViews, BatchedVideoViews
from ssl_kit.transforms.batched_audio import BatchedAudioViews
from ssl_kit.transforms.image import ImageViews, WeakStrongViews, eval_transform
from ssl_kit.transforms.video import VideoViews

__all__ = ["ViewAugmentation", "PairedViews", "ImageViews", "BatchedImageViews", "BatchedVideoViews", "WeakStrongViews", "AudioViews", "BatchedAudioViews", "LogMel", "VideoViews", "eval_transform"]
