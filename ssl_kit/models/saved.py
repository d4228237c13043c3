"""Backbone weights in and out of ssl_kit: read from a training checkpoint, exported (a plain state
dict with its build spec, or a folder of safetensors weights, a timm ``config.json`` and an ONNX
graph), rebuilt from an export, or loaded into a model (``init_from``). Every read goes through
torch's weights-only loader or safetensors: nothing is unpickled."""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ssl_kit.checkpoints import AtomicCheckpointIO, read_checkpoint, saved_input_spec
from ssl_kit.inputs import InputSpec
from ssl_kit.models.backbones import BackboneSpec, backbone_spec, build_from_spec

#: The files of an export folder, named as timm and the Hugging Face Hub name them, so that an
#: uploaded folder of a plain timm architecture loads with ``timm.create_model("hf-hub:USER/REPO", pretrained=True)``.
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
#: What an export folder can hold besides its config (``--formats``).
FOLDER_FORMATS = ("safetensors", "onnx")
#: The ONNX graph's input and output names, and its opset (17: the first with LayerNormalization as one operator).
ONNX_INPUT, ONNX_OUTPUT, ONNX_OPSET = "inputs", "features", 17


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
    """Writes ``<out>.json`` (how to build the model), then ``<out>`` (a plain state dict) as
    checkpoints are written (``AtomicCheckpointIO``): ``<out>`` exists only once both are whole.

    For standard variants ``timm.create_model(name, num_classes=0).load_state_dict(torch.load(out))``
    works; ``load_exported_backbone`` handles the small-image variants too.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(out.suffix + ".json").write_text(spec.to_json())
    AtomicCheckpointIO().save_checkpoint(state_dict, out)
    return out


def export_folder(
    backbone: nn.Module, spec: BackboneSpec, input_spec: InputSpec, folder: str | Path, formats: Sequence[str] = FOLDER_FORMATS
) -> dict[str, Path]:
    """Writes ``backbone`` into ``folder``: ``model.safetensors`` (its weights, timm's names) and
    ``model.onnx`` (its feature function, as the probes read it, for any batch size), as
    ``formats`` asks, and always ``config.json`` (``export_config``). Returns the files by format."""
    unknown = sorted(set(formats) - set(FOLDER_FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; known: {list(FOLDER_FORMATS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"config": folder / CONFIG_FILE}
    if "onnx" in formats:
        files["onnx"] = export_onnx(backbone, input_spec, folder / ONNX_FILE)
    if "safetensors" in formats:
        files["safetensors"] = folder / WEIGHTS_FILE
        save_file({name: tensor.contiguous() for name, tensor in backbone.state_dict().items()}, files["safetensors"], metadata={"format": "pt"})
    files["config"].write_text(json.dumps(export_config(spec, input_spec, backbone.num_features, formats), indent=2))
    return files


def export_onnx(backbone: nn.Module, input_spec: InputSpec, out: str | Path) -> Path:
    """The backbone's features of a batch of ``input_spec`` samples, ``(batch, C, *shape) ->
    (batch, num_features)``, as an ONNX graph with a dynamic batch size; the sample shape is
    fixed. torch's TorchScript exporter traces the network in eval mode; it needs the ``onnx``
    package (the ``export`` extra), where torch 2.9's default, the dynamo exporter, needs onnxscript too."""
    if importlib.util.find_spec("onnx") is None:
        raise ModuleNotFoundError("ONNX export needs the onnx package: pip install 'ssl_kit[export]' (or pip install onnx)")
    out = Path(out)
    # Batch 2: a traced batch of 1 could be specialised into the graph.
    example = torch.randn(2, input_spec.channels, *input_spec.shape, device=next(backbone.parameters()).device)
    was_training = backbone.training
    backbone.eval()
    try:
        with warnings.catch_warnings():
            # Shape checks on the fixed sample size are traced as constants, which is what a fixed size means.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                backbone, (example,), str(out), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}}, opset_version=ONNX_OPSET, dynamo=False,
            )  # fmt: skip
    finally:
        backbone.train(was_training)
    return out


def export_config(spec: BackboneSpec, input_spec: InputSpec, num_features: int, formats: Sequence[str] = FOLDER_FORMATS) -> dict[str, Any]:
    """``config.json`` of an export folder: timm's hub format (``architecture``, ``model_args``, and
    ``pretrained_cfg`` with the input size and normalisation), which ``timm.create_model("local-dir:FOLDER",
    pretrained=True)`` reads for plain timm architectures, and an ``ssl_kit`` section: the small-image
    stem, the input the backbone was trained on, the ONNX graph's interface, and how to build it."""
    channels = input_spec.channels
    ssl_kit: dict[str, Any] = {"cifar_stem": spec.cifar_stem, "input_spec": input_spec.to_dict(), "build": build_instructions(spec)}
    if "onnx" in formats:
        shape = ["batch", channels, *input_spec.shape]
        ssl_kit["onnx"] = {"file": ONNX_FILE, "input": ONNX_INPUT, "input_shape": shape, "output": ONNX_OUTPUT, "opset": ONNX_OPSET}
    return {
        "architecture": spec.name,
        "num_classes": 0,
        "num_features": num_features,
        "model_args": spec.kwargs,
        "pretrained_cfg": {
            "input_size": [channels, *input_spec.shape],
            # No normalisation recorded: inputs are used as they come (spectrograms: standardised by the front end).
            "mean": list(input_spec.mean or [0.0] * channels),
            "std": list(input_spec.std or [1.0] * channels),
        },
        "ssl_kit": ssl_kit,
    }


def timm_builds(spec: BackboneSpec) -> bool:
    """Whether plain timm builds this backbone: not where ssl_kit changes the stem (small-image
    ResNets) or registers the architecture itself (``resnet18_slim``, the video ViTs)."""
    return not spec.cifar_stem and not timm.models.model_entrypoint(spec.name).__module__.startswith("ssl_kit.")


def build_instructions(spec: BackboneSpec, folder: str = "FOLDER") -> str:
    """How the backbone of the export folder ``folder`` is rebuilt, in words, for ``config.json``
    and the model card."""
    ssl_kit = f"ssl_kit.models.load_exported_backbone({folder!r})"
    if timm_builds(spec):
        return f"timm.create_model({'local-dir:' + folder!r}, pretrained=True), or {ssl_kit}"
    build = "import ssl_kit.models (it registers ssl_kit's architectures with timm), then timm.create_model(architecture, **model_args)"
    if spec.cifar_stem:
        build += (
            ", conv1 = Conv2d(model_args.get('in_chans', 3), bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False) and"
            " maxpool = Identity() (ssl_kit's small-image stem)"
        )
    return f"{ssl_kit}; by hand: {build}, then load_state_dict(safetensors.torch.load_file('{WEIGHTS_FILE}'))"


def spec_from_config(config: dict[str, Any], source: Path) -> BackboneSpec:
    """The build spec ``config.json`` describes; a missing key is an error naming the file."""
    try:
        return BackboneSpec(config["architecture"], dict(config.get("model_args") or {}), bool(config.get("ssl_kit", {}).get("cifar_stem", False)))
    except (KeyError, AttributeError, TypeError) as error:
        raise ValueError(f"{source} is not an export config: it needs 'architecture' (and 'model_args'); {error!r}") from error


def read_export(path: str | Path) -> tuple[dict[str, torch.Tensor], BackboneSpec | None]:
    """The weights and build spec of an export: a folder (``python -m ssl_kit.export CKPT FOLDER``)
    or its ``model.safetensors``, read by safetensors with ``config.json`` beside it; or a ``.pt``
    state dict, read by torch's weights-only loader, with its ``.pt.json`` (spec None where that is
    missing). Neither unpickles."""
    path = Path(path)
    if not (path.is_dir() or path.suffix == ".safetensors"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        spec_file = path.with_suffix(path.suffix + ".json")
        return state, BackboneSpec.from_json(spec_file.read_text()) if spec_file.is_file() else None
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    config_file = weights.parent / CONFIG_FILE
    for needed in (weights, config_file):
        if not needed.is_file():
            raise FileNotFoundError(f"{path}: no {needed.name}; an export folder for loading holds {WEIGHTS_FILE} and {CONFIG_FILE}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from error
    return load_file(weights), spec_from_config(config, config_file)


def load_exported_backbone(path: str | Path) -> nn.Module:
    """The backbone an export describes, with the exported weights: an export folder (or its
    ``model.safetensors``), or a ``.pt`` state dict with its ``.pt.json``."""
    state, spec = read_export(path)
    if spec is None:
        raise FileNotFoundError(f"{path}: no build spec {path}.json beside it")
    model = build_from_spec(spec)
    model.load_state_dict(state)
    return model


def load_backbone_weights(backbone: nn.Module, spec: BackboneSpec, path: str | Path) -> None:
    """Loads an ssl_kit checkpoint's backbone (``.ckpt``) or an exported one (``python -m
    ssl_kit.export``: a folder, or a state dict plus ``.json`` spec) into ``backbone``; a
    different architecture is an error naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"init_from: no such file {path}")
    if path.suffix == ".ckpt":
        state, saved_spec = backbone_from_checkpoint(path)
    else:
        state, saved_spec = read_export(path)
    saved_spec = saved_spec or BackboneSpec("unknown")
    try:
        backbone.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"init_from {path}: its backbone ({saved_spec.name}, {saved_spec.kwargs}) does not fit "
            f"this model's ({spec.name}, {spec.kwargs}); use the same --model.backbone and image size. {error}"
        ) from error
