from ssl_kit.losses.barlow_twins import BarlowTwinsLoss
from ssl_kit.losses.mae import MaskedReconstructionLoss
from ssl_kit.losses.moco import InfoNCELoss
from ssl_kit.losses.vicreg import VICRegLoss

__all__ = ["BarlowTwinsLoss", "InfoNCELoss", "MaskedReconstructionLoss", "VICRegLoss"]
