"""Backbone weights in and out of ssl_kit: read from a training checkpoint, exported as a plain
state dict with its build spec, rebuilt from an export, or loaded into a model (``init_from``).
Every read goes through torch's weights-only loader."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ssl_kit.checkpoints import read_checkpoint, saved_input_spec
from ssl_kit.models.backbones import BackboneSpec, backbone_spec, build_from_spec


def backbone_from_checkpoint(ckpt_path: str | Path) -> tuple[dict[str, torch.Tensor], BackboneSpec]:
    """The backbone state dict and its build spec, read from an ssl_kit Lightning checkpoint
    (for a ``MeanTeacher`` checkpoint: the teacher's backbone, the model it delivers)."""
    checkpoint = read_checkpoint(ckpt_path)
    hparams = checkpoint.get("hyper_parameters", {})
    if "backbone" not in hparams or "state_dict" not in checkpoint:
        raise ValueError(f"{ckpt_path} is not an ssl_kit method checkpoint (no backbone hyper-parameter)")
    # Self-training checkpoints deliver their EMA teacher; pretraining ones their backbone.
    prefix = "teacher_backbone." if any(k.startswith("teacher_backbone.") for k in checkpoint["state_dict"]) else "backbone."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    spec = backbone_spec(hparams["backbone"], saved_input_spec(hparams), hparams.get("small_image"), hparams.get("backbone_kwargs"))
    return state, spec


def export_backbone(state_dict: dict[str, torch.Tensor], spec: BackboneSpec, out: str | Path) -> Path:
    """Writes ``<out>`` (a plain state dict) and ``<out>.json`` (how to build the model for it).

    For standard variants ``timm.create_model(name, num_classes=0).load_state_dict(torch.load(out))``
    works; ``load_exported_backbone`` handles the small-image variants too.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, out)
    out.with_suffix(out.suffix + ".json").write_text(spec.to_json())
    return out


def load_exported_backbone(path: str | Path) -> nn.Module:
    """The backbone an export describes (``<path>.json``), with the exported weights."""
    path = Path(path)
    model = build_from_spec(BackboneSpec.from_json(path.with_suffix(path.suffix + ".json").read_text()))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def load_backbone_weights(backbone: nn.Module, spec: BackboneSpec, path: str | Path) -> None:
    """Loads an ssl_kit checkpoint's backbone (``.ckpt``) or an exported one (``python -m
    ssl_kit.export``: a state dict plus ``.json`` spec) into ``backbone``; a different architecture
    is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no such file {path}")
    if path.suffix == ".ckpt":
        state, saved_spec = backbone_from_checkpoint(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        spec_file = path.with_suffix(path.suffix + ".json")
        saved_spec = BackboneSpec.from_json(spec_file.read_text()) if spec_file.is_file() else BackboneSpec("unknown")
    try:
        backbone.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"init_from {path}: its backbone ({saved_spec.name}, {saved_spec.kwargs}) does not fit "
            f"this model's ({spec.name}, {spec.kwargs}); use the same --model.backbone and image size. {error}"
        ) from error
