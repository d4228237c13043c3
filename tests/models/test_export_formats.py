"""Backbones leaving ssl_kit: an ONNX graph computes the same features as PyTorch at any batch
size, a safetensors folder rebuilds the same network (with plain timm where the architecture is
timm's) without unpickling, and ``python -m ssl_kit.export`` writes them with a model card that
lists a results store's rows of the run's configuration."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from safetensors.torch import load_file

from helpers import fit
from ssl_kit.bench.store import Result, ResultStore
from ssl_kit.export import main as export
from ssl_kit.inputs import InputSpec, LogMelSettings
from ssl_kit.models import load_backbone_weights, load_exported_backbone
from ssl_kit.models.backbones import BackboneSpec, backbone_spec, build_from_spec
from ssl_kit.models.saved import export_folder, export_onnx, timm_builds

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VIT = {"embed_dim": 16, "depth": 1, "num_heads": 2}
#: One backbone of each kind, at the small sizes of the tests: (timm name, input, extra kwargs).
BACKBONES = {
    "resnet": ("resnet18_slim", InputSpec.image(8), None),  # with ssl_kit's small-image stem
    "vit": ("vit_tiny_patch16_224", InputSpec.image(8), TINY_VIT),
    # 16 mel bands x 21 frames: 4 px patches leave a remainder of one frame
    "spectrogram_vit": ("vit_tiny_patch16_224", InputSpec.audio(LogMelSettings(sample_rate=8000, clip_samples=1600, n_mels=16)), TINY_VIT),
    "video_vit": ("video_vit_tiny", InputSpec.video(4, 8), TINY_VIT),
}


def samples(input_spec: InputSpec, batch_size: int) -> torch.Tensor:
    return torch.randn(batch_size, input_spec.channels, *input_spec.shape)


def built(kind: str) -> tuple[torch.nn.Module, BackboneSpec, InputSpec]:
    """A backbone in eval mode whose BatchNorm statistics are off their initial values, so that
    an export in training mode would give other features."""
    name, input_spec, kwargs = BACKBONES[kind]
    torch.manual_seed(0)
    spec = backbone_spec(name, input_spec, extra_kwargs=kwargs)
    backbone = build_from_spec(spec)
    with torch.no_grad():
        backbone.train()(samples(input_spec, 4))
    return backbone.eval(), spec, input_spec


@pytest.mark.parametrize("kind", BACKBONES)
def test_onnx_graph_computes_the_features_at_any_batch_size(kind, tmp_path):
    backbone, _, input_spec = built(kind)
    path = export_onnx(backbone, input_spec, tmp_path / "model.onnx")
    assert onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch_size in (1, 5):  # neither is the traced batch size (2)
        inputs = samples(input_spec, batch_size)
        with torch.no_grad():
            expected = backbone(inputs).numpy()
        (features,) = session.run(["features"], {"inputs": inputs.numpy()})
        assert features.shape == (batch_size, backbone.num_features)
        np.testing.assert_allclose(features, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", BACKBONES)
def test_safetensors_folder_rebuilds_the_same_backbone_without_unpickling(kind, tmp_path, monkeypatch):
    backbone, spec, input_spec = built(kind)
    files = export_folder(backbone, spec, input_spec, tmp_path, formats=["safetensors"])
    assert sorted(files) == ["config", "safetensors"] and not (tmp_path / "model.onnx").exists()
    state = backbone.state_dict()
    weights = load_file(files["safetensors"])
    assert weights.keys() == state.keys() and all(torch.equal(weights[key], value) for key, value in state.items())

    # The JSON alone rebuilds the architecture: the same parameters, of the same shapes.
    config = json.loads(files["config"].read_text())
    from_config = build_from_spec(BackboneSpec(config["architecture"], config["model_args"], config["ssl_kit"]["cifar_stem"]))
    assert {key: value.shape for key, value in from_config.state_dict().items()} == {key: value.shape for key, value in state.items()}
    assert config["num_features"] == backbone.num_features and config["pretrained_cfg"]["input_size"] == [input_spec.channels, *input_spec.shape]

    def refuse(*args, **kwargs):
        raise AssertionError("an export folder was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    inputs = samples(input_spec, 3)
    with torch.no_grad():
        expected = backbone(inputs)
        for source in (tmp_path, files["safetensors"]):  # the folder, or its weights file
            assert torch.equal(load_exported_backbone(source).eval()(inputs), expected)
        if timm_builds(spec):  # plain timm architectures: timm's own loader reads the folder
            assert torch.equal(timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()(inputs), expected)
        else:  # ssl_kit's architectures or stem: the config says how to build them
            assert "load_exported_backbone" in config["ssl_kit"]["build"]
            assert ("conv1 = Conv2d" in config["ssl_kit"]["build"]) == spec.cifar_stem


def test_init_from_takes_an_export_folder_and_names_it_when_the_backbone_differs(tmp_path):
    backbone, spec, input_spec = built("resnet")
    export_folder(backbone, spec, input_spec, tmp_path / "export", formats=["safetensors"])
    fresh = build_from_spec(spec)
    load_backbone_weights(fresh, spec, tmp_path / "export")
    assert all(torch.equal(fresh.state_dict()[key], value) for key, value in backbone.state_dict().items())
    vit_spec = backbone_spec("vit_tiny_patch16_224", input_spec, extra_kwargs=TINY_VIT)
    with pytest.raises(ValueError, match="init_from .*export: its backbone \\(resnet18_slim"):
        load_backbone_weights(build_from_spec(vit_spec), vit_spec, tmp_path / "export")


def stored(cell: str, method: str, value: float, fit_config: dict, pipeline: str = "ssl_kit") -> Result:
    return Result(
        suite="suite", cell=cell, method=method, dataset="Digits", backbone="vit_tiny_patch16_224 depth=1", protocol="linear",
        metric="top1", value=value, seed=0, config={"fit": fit_config, "pipeline": pipeline, "protocol": {}}, wall_time_s=1.0,
    )  # fmt: skip


def test_export_command_writes_every_format_and_a_model_card_with_the_store_rows_of_the_run(tmp_path):
    cli = fit("simclr_digits.yaml", tmp_path / "run", "--trainer.max_epochs", "1", "--model.backbone", "vit_tiny_patch16_224",
              "--model.backbone_kwargs", json.dumps(TINY_VIT))  # fmt: skip
    checkpoint = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    fit_config = json.loads(json.dumps(cli.config["fit"].as_dict(), default=str))  # as the suite runner stores it
    other_lr = json.loads(json.dumps(fit_config))
    other_lr["model"]["init_args"]["lr"] *= 2
    store = ResultStore(tmp_path / "results.sqlite")
    store.add([stored("run", "SimCLR", 0.876, fit_config)])
    store.add([stored("baseline", "Random init", 0.5, other_lr)])  # the random-init yardstick of the same backbone
    store.add([stored("other", "SimCLR", 0.123, other_lr)])  # another configuration of the method
    store.add([stored("lightly", "SimCLR", 0.234, fit_config, pipeline="lightly")])  # lightly's pipeline, not this model

    folder = export([checkpoint, str(tmp_path / "export"), "--store", str(store.path)])
    assert sorted(path.name for path in folder.iterdir()) == ["README.md", "config.json", "model.onnx", "model.safetensors"]
    exported, trained = load_exported_backbone(folder).state_dict(), cli.model.backbone.state_dict()
    assert exported.keys() == trained.keys() and all(torch.equal(exported[key], value) for key, value in trained.items())

    card = (folder / "README.md").read_text()
    assert "# SimCLR backbone: vit_tiny_patch16_224" in card and "`ssl_kit.methods.SimCLR`" in card
    assert f"| `lr` | `{cli.model.hparams.lr}` |" in card and f"image, {cli.model.input_spec.channels} × 8 × 8" in card
    assert "| Digits | SimCLR | `vit_tiny_patch16_224 depth=1` | linear | top1 | 87.6 ± 0.0 | 1 | +37.6 |" in card
    assert "| Random init |" in card and "12.3" not in card and "23.4" not in card
    assert "model.onnx" in card and f"load_exported_backbone({str(folder)!r})" in card and "huggingface-cli upload" in card

    # Only what --formats asks for; without a store the card says how to add one.
    onnx_only = export([checkpoint, str(tmp_path / "onnx_only"), "--formats", "onnx"])
    assert sorted(path.name for path in onnx_only.iterdir()) == ["README.md", "config.json", "model.onnx"]
    assert "No results store was given" in (onnx_only / "README.md").read_text()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_exported_backbone(onnx_only)
    with pytest.raises(SystemExit):  # a .pt file is the state dict of before: no formats, no card
        export([checkpoint, str(tmp_path / "backbone.pt"), "--formats", "onnx"])
