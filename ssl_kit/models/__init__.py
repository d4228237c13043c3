from ssl_kit.models.backbones import create_backbone
from ssl_kit.models.saved import backbone_from_checkpoint, export_backbone, export_folder, load_backbone_weights, load_exported_backbone

__all__ = ["create_backbone", "backbone_from_checkpoint", "export_backbone", "export_folder", "load_backbone_weights", "load_exported_backbone"]
