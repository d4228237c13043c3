"""Download-when-online for the DataModules: one rule for every dataset (fetch when allowed and
absent; offline, or on any failure, an error that says which files to put where)."""

from __future__ import annotations

import logging
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def obtain(found: Callable[[], bool], download: Callable[[], None], allowed: bool, missing: str) -> None:
    """Downloads when allowed and possible; otherwise fails saying what to put where."""
    if found():
        return
    if allowed:
        try:
            download()
        except Exception as error:  # noqa: BLE001 - any network failure becomes the same clear message
            log.warning("download failed: %s", error)
    if not found():
        raise FileNotFoundError(missing)


def fetch(url: str, path: Path) -> None:
    """Saves ``url`` at ``path``: the only network call here (tests replace it)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as handle:
        shutil.copyfileobj(response, handle)


def extract(archive: Path, folder: Path) -> None:
    """Unpacks a zip or (compressed) tar archive; neither may write outside ``folder`` (zipfile
    drops absolute and ``..`` parts, tarfile's "data" filter refuses them)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            handle.extractall(folder)
        return
    with tarfile.open(archive) as handle:
        handle.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def download_and_extract(url: str, root: str | Path) -> None:
    """Fetches the zip / tar archive at ``url`` and extracts it into ``root``. An archive holding a
    single top-level folder (GitHub's ``<repo>-master/``) has that folder's contents moved up, so
    the files land where the DataModule looks. Entries already in ``root`` are left as they are."""
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as staging:
        archive = Path(staging) / url.rstrip("/").rsplit("/", 1)[-1]
        log.info("downloading %s into %s", url, root)
        fetch(url, archive)
        extracted = Path(staging) / "extracted"
        extract(archive, extracted)
        entries = list(extracted.iterdir())
        if len(entries) == 1 and entries[0].is_dir():
            entries = list(entries[0].iterdir())
        for entry in entries:
            if not (root / entry.name).exists():
                shutil.move(str(entry), str(root / entry.name))
