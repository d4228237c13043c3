"""Registering ssl_kit's own architectures with timm, so ``--model.backbone NAME`` treats them as any timm model."""

from __future__ import annotations

from typing import Any

#: What timm's ``create_model`` adds to every entry point's keyword arguments.
TIMM_FACTORY_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def architecture_kwargs(name: str, pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """An entry point's own keyword arguments; ssl_kit's architectures have no pretrained weights."""
    if pretrained:
        raise ValueError(f"there are no pretrained weights for ssl_kit's {name}")
    return {key: value for key, value in kwargs.items() if key not in TIMM_FACTORY_KEYS}
