from ssl_kit.methods.barlow_twins import BarlowTwins
from ssl_kit.methods.base import SSLMethod
from ssl_kit.methods.simclr import SimCLR

__all__ = ["SSLMethod", "SimCLR", "BarlowTwins"]
