"""A cache of decoded samples: each file (or shard member) is decoded once, on first read, into a
``.npy`` array under the cache folder, and read back memory-mapped afterwards, so later epochs skip
decoding and resampling.

An entry's name hashes the source's path, size and modification time with the decoding settings
(``variant``, e.g. the sample rate), so a changed source file, or other settings, is decoded again
(old entries are left for the user to delete). Entries are written to a temporary file and renamed
into place, so concurrent loader workers and DDP ranks never read a partial entry, and a crash
leaves at most a stray temporary file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ssl_kit.data.samples import ShardMember, Source


class DecodedCache:
    """``get(source, variant, decode)``: the cached array of ``source`` or, the first time,
    ``decode()``'s, stored for next time."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()

    def entry(self, source: Source, variant: str) -> Path:
        file = Path(source.shard if isinstance(source, ShardMember) else source)
        stat = file.stat()
        identity = f"{source}|{stat.st_size}|{stat.st_mtime_ns}|{variant}"
        key = hashlib.sha1(identity.encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, source: Source, variant: str, decode: Callable[[], np.ndarray]) -> np.ndarray:
        path = self.entry(source, variant)
        if path.is_file():
            return np.load(path, mmap_mode="r")
        array = np.ascontiguousarray(decode())
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.save(stream, array)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return array
