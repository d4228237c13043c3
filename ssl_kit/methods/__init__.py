from ssl_kit.methods.barlow_twins import BarlowTwins
from ssl_kit.methods.base import BackboneModule, SSLMethod
from ssl_kit.methods.mae import MAE
from ssl_kit.methods.moco_v3 import MoCoV3
from ssl_kit.methods.msn import MSN
from ssl_kit.methods.simclr import SimCLR

__all__ = ["BackboneModule", "SSLMethod", "SimCLR", "BarlowTwins", "MoCoV3", "MAE", "MSN"]
