from ssl_kit.methods.barlow_twins import BarlowTwins
from ssl_kit.methods.base import BackboneModule, SSLMethod
from ssl_kit.methods.byol import BYOL
from ssl_kit.methods.data2vec2 import Data2Vec2
from ssl_kit.methods.dino import DINO
from ssl_kit.methods.ijepa import IJEPA
from ssl_kit.methods.mae import MAE
from ssl_kit.methods.moco_v3 import MoCoV3
from ssl_kit.methods.msn import MSN
from ssl_kit.methods.simclr import SimCLR
from ssl_kit.methods.vicreg import VICReg

__all__ = ["BackboneModule", "SSLMethod", "SimCLR", "BarlowTwins", "MoCoV3", "MAE", "MSN", "BYOL", "VICReg", "IJEPA", "Data2Vec2", "DINO"]
