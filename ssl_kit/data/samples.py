"""Where a sample's bytes are: a file path, or a member of a shard (``ssl_kit.data.shards``), and
how a reader opens either."""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path


class UnreadableFileError(RuntimeError):
    """A sample file could not be decoded; the message names the file."""


#: Open shard files per process; beyond this the least recently used is closed.
MAX_OPEN_SHARDS = 64


@dataclass(frozen=True, slots=True)
class ShardMember:
    """One sample inside a shard: its data is ``size`` bytes at ``offset`` of the tar ``shard``.
    ``str()`` is the locator ``<shard>::<member>`` that every error message names."""

    shard: str
    member: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.shard}::{self.member}"


Source = str | ShardMember
Samples = list[tuple[Source, int]]


class _ShardFiles:
    """Shard file descriptors of this process. Forked DataLoader workers inherit the parent's
    object, so descriptors are keyed by ``os.getpid()`` and a worker opens its own; reads are
    positional (``os.pread``), so no shared file offset can race."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.open: OrderedDict[str, int] = OrderedDict()

    def read(self, member: ShardMember) -> bytes:
        if self.pid != os.getpid():  # a forked child: the inherited descriptors belong to the parent
            self.pid, self.open = os.getpid(), OrderedDict()
        try:
            fd = self.open.get(member.shard)
            if fd is None:
                fd = self.open[member.shard] = os.open(member.shard, os.O_RDONLY)
                if len(self.open) > MAX_OPEN_SHARDS:
                    os.close(self.open.popitem(last=False)[1])
            self.open.move_to_end(member.shard)
            data = os.pread(fd, member.size, member.offset)
        except OSError as error:
            raise UnreadableFileError(f"cannot read shard member {member}: {error}") from error
        if len(data) != member.size:
            raise UnreadableFileError(f"shard member {member} is truncated: {len(data)} of {member.size} bytes at offset {member.offset}")
        return data


_SHARD_FILES = _ShardFiles()


def open_sample(source: Source | Path) -> str | io.BytesIO:
    """What a reader opens: the path of a file, or the bytes of a shard member as a ``BytesIO``
    whose ``name`` is the locator (PIL, soundfile and PyAV take either)."""
    if not isinstance(source, ShardMember):
        return str(source)
    data = io.BytesIO(_SHARD_FILES.read(source))
    data.name = str(source)
    return data
