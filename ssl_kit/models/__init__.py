from ssl_kit.models.backbones import create_backbone, export_backbone, load_exported_backbone

__all__ = ["create_backbone", "export_backbone", "load_exported_backbone"]
