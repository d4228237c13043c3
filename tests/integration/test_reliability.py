"""Hostile input: crafted checkpoints never run code; each case is checked in seconds."""

from __future__ import annotations

import pickle

import pytest
import torch

from ssl_kit.checkpoints import read_checkpoint
from ssl_kit.inputs import InputSpec
from ssl_kit.models import backbone_from_checkpoint


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
    from ssl_kit.semi import MeanTeacher

    path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="refusing to load"):
        MeanTeacher(backbone="resnet18", input_spec=InputSpec.image(8), init_from=str(path))
    assert not marker.exists()


def test_a_truncated_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cut.ckpt"):
        read_checkpoint(path)


@pytest.mark.slow
def test_skip_bad_files_under_two_ddp_ranks_keeps_every_rank_training(tmp_path):
    """A folder with unreadable files spread unevenly over the ranks' shards: with
    --data.skip_bad_files every rank's batches keep their size (bad samples replaced by copies of
    readable ones), so SimCLR's all_gather of negatives works on 2 gloo processes (it aborted with
    ``Received data size doesn't match`` when batches were shrunk)."""
    import sys

    from pathlib import Path

    import numpy as np
    from PIL import Image

    from helpers import REPO, TINY, run_command

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
    result = run_command(command, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # the run ends with one summary line and a listing of the distinct files it skipped, on every rank
    assert "unreadable file(s) (--data.skip_bad_files), listed in" in result.stdout
    listed = set((tmp_path / "run" / "skipped_files.txt").read_text().splitlines())
    assert listed and all(int(Path(path).stem) % 5 == 0 for path in listed)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2


def test_a_decompression_bomb_is_named_and_can_be_skipped(tmp_path, monkeypatch):
    """PIL refuses images over twice ``MAX_IMAGE_PIXELS`` with ``DecompressionBombError`` (not an
    OSError): it is reported naming the file, and skipped under skip_bad_files like any bad file."""
    from PIL import Image

    from ssl_kit.data import ImageFolderDataModule
    from ssl_kit.data.samples import UnreadableFileError
    for split, count in (("train", 6), ("val", 2)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    bomb = tmp_path / "train" / "a" / "bomb.png"
    Image.new("RGB", (64, 64)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: a bomb; 8 x 8 is not
    strict = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=14, num_workers=0)
    with pytest.raises(UnreadableFileError, match="bomb.png"):
        next(iter(strict.labeled_dataloader("train")))
    lenient = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=14, num_workers=0, skip_bad_files=True)
    images, _ = next(iter(lenient.labeled_dataloader("train")))
    assert images.shape == (13, 3, 8, 8)


@pytest.mark.slow
def test_a_save_killed_midway_leaves_the_previous_checkpoint_whole(tmp_path):
    """kill -9 while ``AtomicCheckpointIO`` rewrites a 64 MB checkpoint, with $TMPDIR on another
    filesystem where one exists (/dev/shm: where Lightning's own writer stages the file and then
    copies it over the target): the target is always a whole, readable checkpoint, and the next save
    removes the partial file the killed process left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from ssl_kit.checkpoints import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    script = (
        "import sys, torch\n"
        "from ssl_kit.checkpoints import AtomicCheckpointIO\n"
        "io = AtomicCheckpointIO()\n"
        "for step in range(1000):\n"
        "    io.save_checkpoint({'step': step, 'w': torch.full((16_000_000,), float(step))}, sys.argv[1])\n"
        "    print(step, flush=True)\n"
    )
    env = dict(os.environ)
    if os.path.isdir("/dev/shm") and os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev:
        env["TMPDIR"] = "/dev/shm"
    child = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout.readline().strip() == "0"  # one whole save done
    time.sleep(0.15)  # now inside a later save
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    saved = read_checkpoint(target)
    assert torch.all(saved["w"] == saved["step"])
    AtomicCheckpointIO().save_checkpoint({"step": -1}, target)
    assert read_checkpoint(target)["step"] == -1
    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.slow
def test_resume_last_passes_over_an_unreadable_last_ckpt_and_names_it(tmp_path, capsys, caplog):
    """``--ckpt_path last`` with a truncated last.ckpt resumes from the newest readable checkpoint
    (saying which file it passed over) instead of failing with a bare EOFError; with no readable
    checkpoint left it stops, naming the files."""
    import logging

    from helpers import REPO, TINY

    from ssl_kit.fit import main

    args = ["--config", str(REPO / "configs" / "quickstart.yaml"), *TINY, "--trainer.default_root_dir", str(tmp_path),
            "--checkpoint.every_n_epochs", "2"]  # fmt: skip
    main([*args, "--trainer.max_epochs", "2"])
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch0001.ckpt", "last.ckpt"]
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="ssl_kit"):
        cli = main([*args, "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    assert "last.ckpt" in caplog.text and "epoch0001.ckpt" in caplog.text
    assert cli.trainer.current_epoch == 3 and cli.trainer.global_step == 6  # epochs 0-1 restored, epoch 2 trained
    for path in folder.iterdir():
        path.write_bytes(b"")
    with pytest.raises(ValueError, match="every checkpoint in .* is unreadable"):
        main([*args, "--trainer.max_epochs", "4", "--ckpt_path", "last"])


@pytest.mark.slow
def test_an_interrupted_run_resumed_from_last_ends_where_an_uninterrupted_one_does(tmp_path):
    """Three epochs in one go, and the same run stopped after two then resumed with ``--ckpt_path
    last``: with the random generators restored the third epoch draws the same data order and
    views, so the final weights are the same (without them it restarts the generators from the
    seed and ends elsewhere)."""
    from helpers import REPO, TINY
    from lightning.pytorch.callbacks import Callback

    from ssl_kit.checkpoints import read_checkpoint
    from ssl_kit.cli import SSLCLI
    from ssl_kit.fit import main

    class StopAfterTwoEpochs(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 1

    def args(folder):
        return ["--config", str(REPO / "configs" / "quickstart.yaml"), *TINY, "--trainer.default_root_dir", str(tmp_path / folder),
                "--trainer.max_epochs", "3"]  # fmt: skip

    main(args("straight"))
    interrupted = SSLCLI(args=args("resumed"), run=False)
    interrupted.trainer.callbacks.insert(0, StopAfterTwoEpochs())
    interrupted.trainer.fit(interrupted.model, datamodule=interrupted.datamodule)
    assert read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["global_step"] == 4
    main([*args("resumed"), "--ckpt_path", "last"])
    straight, resumed = (read_checkpoint(tmp_path / run / "checkpoints" / "last.ckpt") for run in ("straight", "resumed"))
    assert resumed["global_step"] == straight["global_step"] == 6
    for name, weight in straight["state_dict"].items():
        assert torch.allclose(resumed["state_dict"][name].float(), weight.float(), atol=1e-6), name


@pytest.mark.slow
def test_one_run_per_folder_and_a_fresh_run_keeps_the_earlier_checkpoints(tmp_path, caplog):
    """A run into a folder another live process is writing stops at once, naming the folder and
    that process; once the holder is killed (-9: no clean-up) the folder is free. A fresh run into a
    folder of checkpoints moves them aside, byte for byte, instead of overwriting them; a resumed
    run continues its own."""
    import logging
    import subprocess
    import sys

    from helpers import REPO, TINY

    from ssl_kit.fit import main

    args = ["--config", str(REPO / "configs" / "quickstart.yaml"), *TINY, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1"]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
         "os.write(fd, b'pid %d' % os.getpid()); print('held', flush=True); time.sleep(120)", str(tmp_path / ".checkpoints.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"{tmp_path / 'checkpoints'} is in use by another run \(pid {holder.pid}\)"):
            main(args)
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    main(args)
    first = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()

    with caplog.at_level(logging.WARNING, logger="ssl_kit"):
        main([*args, "--seed_everything", "1"])  # a fresh, other run: the first run's checkpoint goes aside, whole
    (aside,) = tmp_path.glob("checkpoints-previous-*")
    assert str(aside) in caplog.text
    assert (aside / "last.ckpt").read_bytes() == first
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() != first

    main([*args[:-1], "2", "--seed_everything", "1", "--ckpt_path", "last"])  # resumed: nothing moved
    assert len(list(tmp_path.glob("checkpoints-previous-*"))) == 1
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_earlier_checkpoints_go_to_a_folder_no_one_has_used(tmp_path):
    """Two fresh runs within one second would pick the same ``-previous-<time>`` name: the second
    gets ``-2``, so no earlier aside folder is ever merged into or overwritten."""
    from ssl_kit.checkpoints import unused_name

    base = tmp_path / "checkpoints-previous-20261207-190000"
    assert unused_name(base) == base
    base.mkdir()
    assert unused_name(base) == tmp_path / "checkpoints-previous-20261207-190000-2"
    (tmp_path / "checkpoints-previous-20261207-190000-2").mkdir()
    assert unused_name(base).name.endswith("-3")


@pytest.mark.slow
def test_folder_errors_are_one_clear_sentence(tmp_path):
    """A missing root, an empty train/ and a train/ with one class folder each stop with a sentence
    naming the folder (the command line prints it last, once, not inside jsonargparse's chained
    tracebacks); the single-class case says why two classes are needed."""
    import sys

    from PIL import Image

    from helpers import REPO, run_command

    from ssl_kit.data import ImageFolderDataModule

    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"empty/train has no class folders"):
        ImageFolderDataModule(str(tmp_path / "empty"))
    (tmp_path / "one" / "train" / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "train" / "cats" / "0.png")
    with pytest.raises(ValueError, match=r"one/train has one class folder \(cats\).*at least 2 classes"):
        ImageFolderDataModule(str(tmp_path / "one"))
    missing = tmp_path / "missing"
    result = run_command(
        [sys.executable, "-m", "ssl_kit.fit", "--config", str(REPO / "configs" / "simclr_imagefolder.yaml"), "--data.root", str(missing)],
        cwd=REPO, timeout=300,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) <= 3, result.stderr[-2000:]
    assert lines[-1] == f"ssl_kit: error: ImageFolder folder root {missing} has no train/ directory: expected {missing}/train/<class>/*"


def test_a_suite_name_that_cannot_be_a_folder_is_refused(tmp_path):
    from ssl_kit.bench.runner import run_suite

    for name in ("../escape", "a/b", ".."):
        with pytest.raises(ValueError, match="cannot name a folder"):
            run_suite(name, [], store=str(tmp_path / "s.sqlite"), workdir=str(tmp_path / "runs"))
    assert not (tmp_path / "s.sqlite").exists()


def test_limit_batches_of_1_warns_that_it_means_the_whole_epoch(capsys):
    from helpers import REPO

    from ssl_kit.cli import SSLCLI

    cli = SSLCLI(args=["--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.limit_train_batches", "1", "--trainer.logger", "false"], run=False)
    assert cli.trainer.limit_train_batches == 1.0
    assert "--trainer.limit_train_batches 1 is read as 1.0" in capsys.readouterr().err
