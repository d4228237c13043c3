from ssl_kit.losses.barlow_twins import BarlowTwinsLoss

__all__ = ["BarlowTwinsLoss"]
