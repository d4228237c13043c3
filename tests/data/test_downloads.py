"""Download-when-online for the audio DataModules, without a network: the fetch is replaced by a
copy of an archive written here in the real layout (GitHub's ``<repo>-master/`` zip, the flat
Speech Commands tar.gz), and offline the error says which files to put where."""

from __future__ import annotations

import logging
import shutil
import tarfile
import urllib.error
import zipfile

import numpy as np
import pytest
import soundfile

from ssl_kit.data import ESC50DataModule, FSDDDataModule, SpeechCommandsDataModule
from ssl_kit.data import download
from ssl_kit.data.audio import ESC50_URL, FSDD_URL, SPEECH_COMMANDS_URL

AUDIO = dict(batch_size=4, num_workers=0)


def write_wav(path, rate: int = 8000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.zeros(rate // 20, dtype=np.float32), rate)


def serve(monkeypatch, archive):
    """Replaces the network fetch by a copy of ``archive``; returns the URLs asked for."""
    urls = []

    def fetch(url, path):
        urls.append(url)
        shutil.copy(archive, path)

    monkeypatch.setattr(download, "fetch", fetch)
    return urls


def zip_folder(folder, archive):
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.rglob("*")):
            handle.write(path, path.relative_to(folder.parent))


def test_fsdd_is_downloaded_and_moved_out_of_the_repository_folder(tmp_path, monkeypatch):
    source = tmp_path / "src" / "free-spoken-digit-dataset-master"
    for digit in range(10):
        for take in (0, 5, 6):
            write_wav(source / "recordings" / f"{digit}_jackson_{take}.wav")
    (source / "README.md").write_text("fsdd")
    zip_folder(source, tmp_path / "master.zip")
    urls = serve(monkeypatch, tmp_path / "master.zip")
    root = tmp_path / "fsdd"
    data = FSDDDataModule(str(root), val_fraction=0.5, **AUDIO)
    data.setup("fit")
    assert urls == [FSDD_URL]
    assert (len(data.splits.train), len(data.splits.val), len(data.splits.test)) == (10, 10, 10)
    assert sorted(p.name for p in root.iterdir()) == ["README.md", "recordings"]  # no staging folder left
    FSDDDataModule(str(root), val_fraction=0.5, **AUDIO).setup("fit")
    assert urls == [FSDD_URL]  # present now: not fetched again


def test_esc50_is_downloaded(tmp_path, monkeypatch):
    source = tmp_path / "src" / "ESC-50-master"
    lines = ["filename,fold,target,category"]
    for fold in range(1, 6):
        for target in (0, 1):
            lines.append(f"{fold}-{target}-A-0.wav,{fold},{target},c{target}")
            write_wav(source / "audio" / f"{fold}-{target}-A-0.wav", 44100)
    (source / "meta").mkdir()
    (source / "meta" / "esc50.csv").write_text("\n".join(lines))
    zip_folder(source, tmp_path / "master.zip")
    urls = serve(monkeypatch, tmp_path / "master.zip")
    data = ESC50DataModule(str(tmp_path / "esc50"), val_fraction=0.25, clip_seconds=0.5, **AUDIO)
    data.setup("fit")
    assert urls == [ESC50_URL] and len(data.splits.test) == 2 and len(data.splits.train) + len(data.splits.val) == 8


def test_speech_commands_flat_tarball_is_downloaded(tmp_path, monkeypatch):
    source = tmp_path / "src"
    words = [f"w{i:02d}" for i in range(35)]
    for word in words:
        for take in range(3):
            write_wav(source / word / f"s{take}_nohash_0.wav", 16000)
    write_wav(source / "_background_noise_" / "noise.wav", 16000)
    (source / "validation_list.txt").write_text("".join(f"{w}/s1_nohash_0.wav\n" for w in words))
    (source / "testing_list.txt").write_text("".join(f"{w}/s2_nohash_0.wav\n" for w in words))
    with tarfile.open(tmp_path / "speech.tar.gz", "w:gz") as handle:
        for path in sorted(source.iterdir()):
            handle.add(path, f"./{path.name}")  # the release's member names start with ./
    urls = serve(monkeypatch, tmp_path / "speech.tar.gz")
    data = SpeechCommandsDataModule(str(tmp_path / "speech"), **AUDIO)
    data.setup("fit")
    assert urls == [SPEECH_COMMANDS_URL]
    assert (len(data.splits.train), len(data.splits.val), len(data.splits.test)) == (35, 35, 35)


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (FSDDDataModule, "recordings/<digit>_<speaker>_<take>.wav"),
        (ESC50DataModule, "meta/esc50.csv"),
        (SpeechCommandsDataModule, "testing_list.txt"),
    ],
    ids=["fsdd", "esc50", "speech_commands"],
)
def test_offline_download_fails_saying_what_to_put_where(tmp_path, monkeypatch, caplog, module, expected):
    urls = []

    def offline(url, path):
        urls.append(url)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(download, "fetch", offline)
    with caplog.at_level(logging.WARNING), pytest.raises(FileNotFoundError) as caught:
        module(str(tmp_path), **AUDIO).setup("fit")
    message = str(caught.value)
    assert len(urls) == 1 and urls[0] in message and str(tmp_path) in message and expected in message
    assert any("download failed" in r.getMessage() and "network is unreachable" in r.getMessage() for r in caplog.records)
    assert [p.name for p in tmp_path.iterdir()] == []  # the staging folder is cleaned up
    with pytest.raises(FileNotFoundError, match=expected.split("/")[-1]):
        module(str(tmp_path), download=False, **AUDIO).setup("fit")
    assert len(urls) == 1  # download=False never fetches


def test_extract_keeps_existing_entries_and_refuses_paths_outside(tmp_path, monkeypatch):
    source = tmp_path / "src" / "repo-master"
    (source / "data").mkdir(parents=True)
    (source / "data" / "x.txt").write_text("new")
    (source / "NOTES").write_text("new")
    zip_folder(source, tmp_path / "repo.zip")
    serve(monkeypatch, tmp_path / "repo.zip")
    root = tmp_path / "root"
    root.mkdir()
    (root / "NOTES").write_text("mine")
    download.download_and_extract("https://example.org/repo.zip", root)
    assert (root / "NOTES").read_text() == "mine" and (root / "data" / "x.txt").read_text() == "new"
    with tarfile.open(tmp_path / "evil.tar", "w") as handle:
        handle.add(tmp_path / "src" / "repo-master" / "NOTES", "../escaped.txt")
    serve(monkeypatch, tmp_path / "evil.tar")
    with pytest.raises(tarfile.OutsideDestinationError):
        download.download_and_extract("https://example.org/evil.tar", root)
    assert not list(tmp_path.rglob("escaped.txt"))
