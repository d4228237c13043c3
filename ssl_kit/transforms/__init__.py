from ssl_kit.transforms.base import ViewAugmentation
from ssl_kit.transforms.image import ImageViews, eval_transform

__all__ = ["ViewAugmentation", "ImageViews", "eval_transform"]
