from ssl_kit.methods.barlow_twins import BarlowTwins
from ssl_kit.methods.base import BackboneModule, SSLMethod
from ssl_kit.methods.mae import MAE
from ssl_kit.methods.moco_v3 import MoCoV3
from ssl_kit.methods.msn import MSN
from ssl_kit.methods.simclr import SimCLR

__all__ = ["BackboneModule", "SSLMethod", "SimCLR", "BarlowTwins", "MoCoV3", "MAE", "MSN"]


def __getattr__(name: str):
    """``ssl_kit.methods.MeanTeacher``, where checkpoints and configs written before self-training
    moved to ``ssl_kit.semi`` name it (Lightning checks a checkpoint's recorded class path)."""
    if name == "MeanTeacher":
        from ssl_kit.semi import MeanTeacher

        return MeanTeacher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
