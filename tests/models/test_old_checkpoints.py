"""Checkpoints written by an earlier layout of ssl_kit (``tests/fixtures``) still load through
every public path: export, ``--model.init_from``, Noisy Student's teacher and a suite's
``checkpoint:`` entry."""

from __future__ import annotations

import torch

from helpers import REPO, TINY
from ssl_kit.inputs import InputSpec
from ssl_kit.export import main as export
from ssl_kit.models import backbone_from_checkpoint
from ssl_kit.models import load_exported_backbone

FIXTURES = REPO / "tests" / "fixtures"
VIT = ["--model.backbone", "vit_tiny_patch16_224", "--model.backbone_kwargs", '{"embed_dim": 16, "depth": 1, "num_heads": 2}']


def test_old_checkpoints_export_their_backbones(tmp_path):
    for name, prefix in [("simclr_v0", "backbone."), ("mean_teacher_v0", "teacher_backbone.")]:
        checkpoint = torch.load(FIXTURES / f"{name}.ckpt", weights_only=True)
        state, spec = backbone_from_checkpoint(FIXTURES / f"{name}.ckpt")
        assert spec.name == "vit_tiny_patch16_224" and spec.kwargs["embed_dim"] == 16
        rebuilt = load_exported_backbone(export([str(FIXTURES / f"{name}.ckpt"), str(tmp_path / f"{name}.pt")]))
        for key, value in rebuilt.state_dict().items():
            assert torch.equal(value, checkpoint["state_dict"][prefix + key]), key
        assert state.keys() == rebuilt.state_dict().keys()


def test_an_old_pretraining_checkpoint_initialises_self_training_and_an_old_teacher_loads(tmp_path):
    from ssl_kit.cli import SSLCLI
    from ssl_kit.semi import MeanTeacher

    simclr = torch.load(FIXTURES / "simclr_v0.ckpt", weights_only=True)["state_dict"]
    cli = SSLCLI(args=["--config", str(REPO / "configs" / "mean_teacher_digits.yaml"), *TINY, *VIT,
                       "--model.init_from", str(FIXTURES / "simclr_v0.ckpt"), "--trainer.default_root_dir", str(tmp_path)], run=False)  # fmt: skip
    for key, value in cli.model.teacher_backbone.state_dict().items():
        assert torch.equal(value, simclr["backbone." + key]), key

    teacher = MeanTeacher.load_from_checkpoint(FIXTURES / "mean_teacher_v0.ckpt", map_location="cpu")
    saved = torch.load(FIXTURES / "mean_teacher_v0.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(value, saved[key]) for key, value in teacher.state_dict().items())
    assert teacher.input_spec == InputSpec.image(8)  # from the image_size it recorded


def test_an_old_checkpoint_loads_as_a_suite_entry(tmp_path):
    from ssl_kit.bench.runner import Cell, Entry

    entry = Entry(method="SimCLR", dataset="Digits", config=str(REPO / "configs" / "simclr_digits.yaml"),
                  args=[*TINY, *VIT, "--model.projection_hidden_dim", "32", "--model.projection_dim", "16"],
                  checkpoint=str(FIXTURES / "simclr_v0.ckpt"))  # fmt: skip
    _, network, throughput = Cell("old", entry, 0, {"knn": {}}, tmp_path).pretrain()
    saved = torch.load(FIXTURES / "simclr_v0.ckpt", weights_only=True)["state_dict"]
    assert throughput is None
    assert all(torch.equal(value, saved["backbone." + key]) for key, value in network.state_dict().items())
