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


def test_skip_bad_files_under_two_ddp_ranks_keeps_every_rank_training(tmp_path):
    """A folder with unreadable files spread unevenly over the ranks' shards: with
    --data.skip_bad_files every rank's batches keep their size (bad samples replaced by copies of
    readable ones), so SimCLR's all_gather of negatives works on 2 gloo processes (it aborted with
    ``Received data size doesn't match`` when batches were shrunk)."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from conftest import REPO, TINY

    rng = np.random.default_rng(0)
    for cls in ("a", "b", "c"):
        folder = tmp_path / "images" / "train" / cls
        folder.mkdir(parents=True)
        for i in range(16):
            path = folder / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
            if i % 5 == 0:
                path.write_bytes(b"not an image")
    command = [
        sys.executable, "-m", "ssl_kit.fit", "--config", str(REPO / "configs" / "simclr_imagefolder.yaml"),
        "--data.root", str(tmp_path / "images"), "--trainer.default_root_dir", str(tmp_path / "run"), *TINY,
        "--data.batch_size", "8", "--data.skip_bad_files", "true", "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--trainer.max_epochs", "1",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unreadable file(s)" in result.stderr
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
