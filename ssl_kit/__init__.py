"""ssl_kit: self- and semi-supervised learning for images, audio and video on PyTorch Lightning."""

__version__ = "0.1.0"
