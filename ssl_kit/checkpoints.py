"""Checkpoint files that survive a kill -9 and are read without unpickling code.

``AtomicCheckpointIO`` writes each checkpoint to a temporary file beside its target and renames it
over the target: Lightning's own save stages the file in ``$TMPDIR`` and, when that is on another
filesystem, moves it by copying, so a kill during the copy leaves a truncated ``last.ckpt`` and the
previous good one gone. ``resume_checkpoint`` picks the newest readable checkpoint of a run for
``--ckpt_path last``, naming any it has to pass over. ``RandomStateCheckpoint`` carries the random
generators across a resume. ``RunFolderGuard`` keeps one run per checkpoint folder and a fresh run
from overwriting an earlier one's checkpoints. ``read_checkpoint`` loads with torch's weights-only
unpickler.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ssl_kit.inputs import InputSpec

log = logging.getLogger("ssl_kit")

#: Where older checkpoints say a class lives -> where it lives now. LightningCLI records the import
#: path of the model's class in the checkpoint, and Lightning refuses to load one whose recorded
#: class is not an imported subclass of the one asked for.
MOVED_CLASSES = {"ssl_kit.methods.MeanTeacher": "ssl_kit.semi.MeanTeacher"}


def upgrade_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """An older checkpoint's hyper-parameters as today's model takes them: its class's new path
    (``MOVED_CLASSES``), and ``image_size`` (an int, ``(H, W)`` or ``(T, H, W)``, before the input
    had a typed description) replaced by the ``input_spec`` it stands for."""
    upgraded = dict(hparams)
    if upgraded.get("_class_path") in MOVED_CLASSES:
        upgraded["_class_path"] = MOVED_CLASSES[upgraded["_class_path"]]
    if "image_size" in upgraded:
        size = upgraded.pop("image_size")
        channels = int((upgraded.get("backbone_kwargs") or {}).get("in_chans", 3))
        if isinstance(size, int):
            spec = InputSpec.image(size, channels=channels)
        elif len(size) == 3:
            spec = InputSpec.video(size[0], size[1], channels=channels)
        else:  # (n_mels, frames) spectrograms were the 1-channel two-size inputs
            spec = InputSpec("audio" if channels == 1 else "image", tuple(size), channels)
        upgraded.setdefault("input_spec", spec.to_dict())
    return upgraded


def saved_input_spec(hparams: dict[str, Any]) -> InputSpec:
    """The input a checkpoint's model was built for, whatever its age."""
    return InputSpec.coerce(upgrade_hparams(hparams).get("input_spec"))


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's contents, unpickled with torch's weights-only loader: tensors, numbers,
    strings and plain containers, never arbitrary objects, so a crafted file cannot run code. A file
    holding anything else is refused with its name. ``mmap`` maps the tensors instead of reading
    them, for a look at the metadata only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load {path}: it holds objects beyond tensors and plain containers, which only a "
            f"full unpickling (able to run code) would rebuild. ssl_kit never does that; re-save the weights. ({error})"
        ) from error
    except (EOFError, RuntimeError) as error:
        raise ValueError(f"cannot read the checkpoint {path}: {error}") from error


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on local disks: the bytes go to
    ``.<name>.tmp-<pid>`` in the target's folder, are flushed to disk, then renamed over the target
    (one filesystem, so the rename is atomic): the target is always the old or the new checkpoint,
    whole. Remote paths (``s3://`` ...) keep Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a process killed mid-save
            stale.unlink(missing_ok=True)
        partial = target.parent / f".{target.name}.tmp-{os.getpid()}"
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)


def is_readable_checkpoint(path: Path) -> bool:
    """Cheap completeness check: torch's zip format ends with the archive's directory, which a
    truncated file lacks."""
    return path.is_file() and path.stat().st_size > 0 and zipfile.is_zipfile(path)


def resume_checkpoint(folder: str | Path) -> str | None:
    """The checkpoint ``--ckpt_path last`` should resume: ``last.ckpt``, or when that is unreadable
    (say, a save cut short on an old version) the newest readable ``*.ckpt`` of the folder, with a
    warning naming what was passed over. None when the folder holds no checkpoint; an error naming
    the files when it holds only unreadable ones."""
    folder = Path(folder)
    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime), reverse=True)
    unreadable = [path for path in candidates if not is_readable_checkpoint(path)]
    readable = [path for path in candidates if path not in unreadable]
    if unreadable and readable:
        log.warning("ssl_kit: skipping unreadable checkpoint(s) %s; resuming from %s", ", ".join(map(str, unreadable)), readable[0])
    if unreadable and not readable:
        raise ValueError(f"cannot resume: every checkpoint in {folder} is unreadable ({', '.join(p.name for p in unreadable)})")
    return str(readable[0]) if readable else None


class RandomStateCheckpoint(Callback):
    """Saves the random number generators (python, numpy, torch, CUDA) in every checkpoint and
    restores them with it, so a resumed run draws the same data order and augmentations as an
    uninterrupted one (Lightning restores callbacks before it builds the first data iterator, and
    isolates the sanity check's draws). The state is rank zero's (the one that saves); with
    ``seed_everything`` every rank starts from that same seed anyway. Loader workers keep their own
    generators, so exact resumes need views computed in the main process (``BatchedImageViews``)
    or ``--data.num_workers 0``. Stored as tensors and plain numbers, which ``read_checkpoint``'s
    weights-only loader reads."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position, "has_gauss": has_gauss, "gauss": gauss},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        numpy = state_dict["numpy"]
        np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"], numpy["gauss"]))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def unused_name(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... whichever does not exist yet."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


class RunFolderGuard(Callback):
    """One run per checkpoint folder, and no run's checkpoints overwritten by a fresh run.

    * From the start of a fit to its end, rank zero holds an exclusive ``flock`` on
      ``.<folder name>.lock`` beside each local checkpoint folder. A second run into the same folder
      stops at once with an error naming the folder and the process that holds it: two runs saving
      ``last.ckpt`` in turn would each resume, or be scored on, the other's weights. The system drops
      the lock when its process ends, kill -9 included, so no stale lock outlives a run.
    * A fresh run (no checkpoint resumed) into a folder that holds checkpoints moves them, at its
      first save, into ``<folder>-previous-<time>/`` beside it, and says so; a resumed run continues
      its own. Lightning's default is to overwrite them.
    """

    def __init__(self) -> None:
        self.locks: list[int] = []
        self.found: dict[Path, list[Path]] = {}  # folder -> the checkpoints it held when the fit started

    @staticmethod
    def folders(trainer) -> list[Path]:
        paths = {callback.dirpath for callback in trainer.checkpoint_callbacks if callback.dirpath}
        return sorted(Path(path) for path in paths if isinstance(get_filesystem(path), LocalFileSystem))

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no flock, so no lock
            fcntl = None
        for folder in self.folders(trainer):
            folder.parent.mkdir(parents=True, exist_ok=True)
            self.found[folder] = sorted(folder.glob("*.ckpt"))
            if fcntl is None:
                continue
            handle = os.open(folder.parent / f".{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(handle, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(handle)
                self.release()
                raise RuntimeError(
                    f"{folder} is in use by another run ({holder}): two runs saving checkpoints there would overwrite "
                    "each other's. Wait for it to end, or give this run another --trainer.default_root_dir."
                ) from None
            os.ftruncate(handle, 0)
            os.pwrite(handle, f"pid {os.getpid()} on {os.uname().nodename}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
            self.locks.append(handle)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        found, self.found = self.found, {}  # only before the first save
        if trainer.ckpt_path is not None:
            return
        for folder, paths in found.items():
            paths = [path for path in paths if path.exists()]
            if paths:
                aside = unused_name(folder.with_name(f"{folder.name}-previous-{time.strftime('%Y%m%d-%H%M%S')}"))
                aside.mkdir()
                for path in paths:
                    path.rename(aside / path.name)
                log.warning("ssl_kit: %s held an earlier run's checkpoints; this fresh run moved them to %s", folder, aside)

    def release(self) -> None:
        for handle in self.locks:
            os.close(handle)  # closing drops the flock
        self.locks, self.found = [], {}

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.release()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.release()
