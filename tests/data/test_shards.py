"""Sharded datasets: a converted ImageFolder / AudioFolder / VideoFolder reads back the folder's
samples, classes and splits; each sample is seen once per epoch across 2 DDP ranks x 2 workers;
training on shards starts with the folder's loss; bad members and incomplete conversions are named."""

from __future__ import annotations

import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, TINY_RUN, fit, run_command, write_audio_folder, write_mp4
from ssl_kit.data import AudioFolderDataModule, ImageFolderDataModule, KineticsDataModule, VideoFolderDataModule
from ssl_kit.data.samples import ShardMember, UnreadableFileError, open_sample
from ssl_kit.data.shards import convert, main as convert_main


def write_images(root: Path, per_class: dict[str, int], seed: int = 0, size: int = 12) -> None:
    """``root/<split>/<class>/<i>.png`` of random pixels (so every image differs)."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for cls in ("ant", "bee", "cat"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def write_videos(root: Path) -> None:
    """mp4 clips plus one frame-folder video per class in train/, two mp4s per class in test/; no val/."""
    for label, cls in enumerate(("left", "right")):
        frames = root / "train" / cls / "frames"
        frames.mkdir(parents=True)
        for i in range(3):
            write_mp4(root / "train" / cls / f"{i}.mp4", frames=6, size=16, shade=40 * i + 100 * label)
        for t in range(5):
            Image.new("RGB", (16, 16), (20 * t, 50 * label, 7)).save(frames / f"{t:03d}.png")
        (root / "test" / cls).mkdir(parents=True)
        for i in range(2):
            write_mp4(root / "test" / cls / f"{i}.mp4", frames=6, size=16, shade=60 + 30 * i + label)


AUDIO = dict(sample_rate=8000, clip_seconds=0.5, n_mels=32, n_fft=256)
VIDEO = dict(frames_per_clip=4, frame_stride=1, frame_size=16)
MODALITIES = {
    "image": (lambda root: write_images(root, {"train": 7, "test": 2}), ImageFolderDataModule, {}),
    "audio": (write_audio_folder, AudioFolderDataModule, AUDIO),
    "video": (write_videos, VideoFolderDataModule, VIDEO),
}


def decoded(item) -> np.ndarray:
    sample, _ = item
    return np.asarray(sample)


@pytest.mark.parametrize("modality", sorted(MODALITIES))
def test_shards_read_back_the_folder_samples_classes_and_splits(tmp_path, modality):
    write, datamodule, options = MODALITIES[modality]
    write(tmp_path / "folder")
    index = convert(str(tmp_path / "folder"), str(tmp_path / "shards"), modality, shard_size_mb=0.006)
    assert all(len({row[0] for row in rows}) >= 2 for rows in index["splits"].values())  # cut at the size limit
    folder, shards = (datamodule(str(tmp_path / name), num_workers=0, val_fraction=0.34, **options) for name in ("folder", "shards"))
    folder.setup(), shards.setup()
    assert shards.classes == folder.classes and shards.num_classes == folder.num_classes
    if modality == "video":  # Kinetics in class-folder mode reads the shards as VideoFolder does
        assert KineticsDataModule(str(tmp_path / "shards"), **VIDEO).classes == folder.classes
    for split in ("train", "val", "test"):  # val: the seeded holdout of train, the same on both
        raw = folder.source.split(split)
        sharded = shards.source.split(split)
        assert (raw is None) == (sharded is None) == (split == "val") and len(raw or []) == len(sharded or [])
        for (path, label), (member, shard_label) in zip(raw or [], sharded or []):
            assert label == shard_label and isinstance(member, ShardMember) and member.shard.startswith(str(tmp_path / "shards"))
            if Path(path).is_file():  # the member holds the file's bytes unchanged
                assert open_sample(member).read() == Path(path).read_bytes()
        first, second = getattr(folder.splits, split), getattr(shards.splits, split)
        assert len(first) == len(second) > 0 and np.array_equal(first.labels, second.labels)
        for i in range(len(first)):
            assert np.array_equal(decoded(first[i]), decoded(second[i]))
    for name in index["shards"]:  # plain tars: tarfile lists exactly the indexed members
        with tarfile.open(tmp_path / "shards" / name) as tar:
            members = [row[3] for rows in index["splits"].values() for row in rows if row[0] == name]
            assert tar.getnames() == members


DDP_EPOCH = textwrap.dedent(
    """
    import sys, numpy as np, torch, lightning as L
    from torch.utils.data import get_worker_info
    from ssl_kit.data import ImageFolderDataModule
    from ssl_kit.transforms.base import ViewAugmentation

    class PixelsAndWorker(ViewAugmentation):
        # the decoded pixels as read from the shard (no augmentation) and the loader worker that read them
        def build(self):
            pass

        def __call__(self, image):
            return [torch.from_numpy(np.asarray(image)[0, 0].copy()), torch.tensor(get_worker_info().id)]

    class Record(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            (pixels, workers), labels = batch
            self.seen += [[label, *pixel, worker] for label, pixel, worker in zip(labels.tolist(), pixels.tolist(), workers.tolist())]
            return self.weight.sum()

        def on_train_epoch_end(self):
            gathered = self.all_gather(torch.tensor(self.seen))  # (ranks, samples per rank, 5)
            if self.global_rank == 0:
                torch.save({"seen": gathered.tolist(), "world_size": self.trainer.world_size}, sys.argv[2])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = ImageFolderDataModule(sys.argv[1], image_size=8, batch_size=4, num_workers=2, views=PixelsAndWorker())
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Record(), datamodule=data)
    """
)


@pytest.mark.slow
def test_every_sample_once_per_epoch_across_two_ranks_and_two_workers(tmp_path):
    classes = [f"c{i:02d}" for i in range(16)]
    for split in ("train", "val"):  # one training image per class, so its label names it; explicit val/: no holdout
        for i, cls in enumerate(classes):
            (tmp_path / "folder" / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8), (i * 15, i, 255 - i)).save(tmp_path / "folder" / split / cls / "x.png")
    convert(str(tmp_path / "folder"), str(tmp_path / "shards"), "image", shard_size_mb=0.004)
    script = tmp_path / "epoch.py"
    script.write_text(DDP_EPOCH)
    result = run_command([sys.executable, str(script), str(tmp_path / "shards"), str(tmp_path / "seen.pt")], cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = torch.load(tmp_path / "seen.pt")
    # 16 samples = 2 ranks x 2 workers x 1 batch of 4: DistributedSampler pads nothing, drop_last drops nothing
    assert record["world_size"] == 2 and [len(rank) for rank in record["seen"]] == [8, 8]
    assert all(sorted(worker for *_, worker in rank) == [0] * 4 + [1] * 4 for rank in record["seen"])
    seen = sorted(tuple(sample[:4]) for rank in record["seen"] for sample in rank)
    assert seen == [(i, i * 15, i, 255 - i) for i in range(16)]  # each image once, with its own pixels


@pytest.mark.parametrize("workers", ["0", "2"])
@pytest.mark.slow
def test_first_training_loss_on_shards_equals_the_folder(tmp_path, workers):
    write_images(tmp_path / "folder", {"train": 4, "val": 1}, size=20)
    convert(str(tmp_path / "folder"), str(tmp_path / "shards"), "image", shard_size_mb=0.004)
    losses = []
    for name in ("folder", "shards"):
        cli = fit(
            "simclr_imagefolder.yaml", tmp_path / f"run_{name}", "--data.root", str(tmp_path / name), "--data.image_size", "8",
            "--data.batch_size", "8", "--data.num_workers", workers, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
            "--trainer.logger", "false", base=TINY_RUN,
        )  # fmt: skip
        losses.append(cli.trainer.callback_metrics["train/loss"].item())
    assert losses[0] == losses[1] and np.isfinite(losses[0])


def test_bad_member_is_named_or_skipped_and_incomplete_conversions_are_refused(tmp_path, caplog, capsys):
    write_images(tmp_path / "folder", {"train": 3, "val": 1})
    bad = tmp_path / "folder" / "train" / "bee" / "1.png"
    bad.write_bytes(b"not a png at all")
    convert(str(tmp_path / "folder"), str(tmp_path / "shards"), "image")
    shard = tmp_path / "shards" / "train-000000.tar"
    data = ImageFolderDataModule(str(tmp_path / "shards"), num_workers=0, image_size=8)
    with pytest.raises(UnreadableFileError, match=rf"{shard}::bee/1.png.*skip_bad_files"):
        for _ in data.labeled_dataloader("train"):
            pass
    data = ImageFolderDataModule(str(tmp_path / "shards"), num_workers=0, image_size=8, skip_bad_files=True)
    assert sum(len(labels) for _, labels in data.labeled_dataloader("train")) == 9 and "bee/1.png" in caplog.text  # refilled
    # a converter refuses a non-empty output; with --overwrite it rewrites it
    with pytest.raises(SystemExit, match="not empty.*--overwrite"):
        convert_main([str(tmp_path / "folder"), str(tmp_path / "shards"), "--modality", "image"])
    convert_main([str(tmp_path / "folder"), str(tmp_path / "shards"), "--modality", "image", "--overwrite"])
    assert "train 9 samples in 1 shard(s)" in capsys.readouterr().out
    # without shards.json (an interrupted conversion) the folder is not shards: a folder error names it
    (tmp_path / "shards" / "shards.json").unlink()
    with pytest.raises(FileNotFoundError, match="no train/ directory"):
        ImageFolderDataModule(str(tmp_path / "shards"))
    with pytest.raises(FileNotFoundError, match="Kinetics not found"):
        KineticsDataModule(str(tmp_path / "shards"))
    convert(str(tmp_path / "folder"), str(tmp_path / "shards"), "image", overwrite=True)
    with pytest.raises(ValueError, match="holds image shards, not audio"):
        AudioFolderDataModule(str(tmp_path / "shards"))
    with shard.open("r+b") as handle:  # a damaged shard is named when the DataModule opens the index
        handle.truncate(1024)
    with pytest.raises(FileNotFoundError, match=f"shard {shard}.*re-run the conversion"):
        ImageFolderDataModule(str(tmp_path / "shards"))
