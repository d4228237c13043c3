"""Hostile input: crafted checkpoints never run code; each case is checked in seconds."""

from __future__ import annotations

import pickle

import pytest
import torch

from ssl_kit.export import backbone_from_checkpoint, read_checkpoint


class Payload:
    """Unpickling this calls ``marker.touch()``: what a crafted checkpoint would do with os.system."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def crafted_checkpoint(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "crafted.ckpt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": {}, "hyper_parameters": {"backbone": "resnet18"}, "evil": Payload(marker)}, handle)
    return path, marker


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path):
    path, marker = crafted_checkpoint(tmp_path)
    with open(path, "rb") as handle:  # the payload is real: a plain unpickling runs it
        pickle.load(handle)
    assert marker.exists()
    marker.unlink()
    for load in (read_checkpoint, backbone_from_checkpoint):
        with pytest.raises(ValueError, match="refusing to load .*crafted.ckpt"):
            load(path)
        assert not marker.exists()


def test_a_crafted_checkpoint_in_init_from_and_in_a_suite_entry_is_refused(tmp_path):
    from ssl_kit.methods import MeanTeacher

    path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="refusing to load"):
        MeanTeacher(backbone="resnet18", image_size=8, init_from=str(path))
    assert not marker.exists()


def test_a_truncated_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cut.ckpt"):
        read_checkpoint(path)
