# The on-disk form of a JSON-lines log, written by the host and the guests (shared/log.py) and read back by every
# log tool (apf_emu/logs.py): plain `<stem>.jsonl`, or gzip-compressed `<stem>.<pid>.jsonl.gz`.
#
# Every line must survive a SIGKILL of its writer, so a compressed line is flushed as soon as it is written
# (zlib's Z_SYNC_FLUSH: the deflate stream is byte-aligned after each line and everything written so far can be
# decompressed). A killed writer leaves a stream without its gzip trailer, which the reader takes as the end of that
# file, exactly as it takes a cut last line of a plain file. A compressed file is never appended to by a second
# process (a restarted host, a guest's next boot): that could not be read past the first stream's cut, so each
# writer has a file of its own, named with its pid. The reader tells the formats apart by their first bytes.
#
# The axis: COMPRESSIONS names the formats (`--log-compress`); adding one is a writer class here, its suffix and
# magic bytes, and a branch in `read_chunks`.
from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Final

COMPRESSIONS: Final = ("none", "gzip")
GZIP_MAGIC: Final = b"\x1f\x8b"
READ_CHUNK: Final = 1 << 20
PIECE: Final = 4096


class CorruptLog(ValueError):
    """A compressed log that cannot be decompressed where its data should be (not merely cut short)."""


def log_path(log_dir: Path, stem: str, compression: str) -> Path:
    """Where one process writes its log: `host.jsonl`, `guest-0.jsonl`, or `host.<pid>.jsonl.gz`."""
    if compression == "none":
        return log_dir / f"{stem}.jsonl"
    if compression == "gzip":
        return log_dir / f"{stem}.{os.getpid()}.jsonl.gz"
    raise ValueError(f"unknown log compression {compression!r}")


def is_log_file(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz", ".log"))


class LineWriter:
    """Writes whole lines to a file descriptor, each at once (one write(2)), plainly or through a compressor."""

    __slots__ = ("_z", "fd")

    def __init__(self, fd: int, compression: str = "none") -> None:
        self.fd = fd
        self._z = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if compression == "gzip" else None

    def write(self, line: bytes) -> None:
        z = self._z
        os.write(self.fd, line if z is None else z.compress(line) + z.flush(zlib.Z_SYNC_FLUSH))

    def finish(self) -> None:
        """A clean end: the compressed stream gets its trailer."""
        if self._z is not None:
            os.write(self.fd, self._z.flush(zlib.Z_FINISH))
            self._z = None


def read_chunks(path: str) -> Iterator[bytes]:
    """The bytes of a log file, decompressed if it is compressed. A stream cut by a killed writer ends where it
    was cut; bytes that are not a valid stream raise CorruptLog."""
    with open(path, "rb") as f:
        first = f.read(READ_CHUNK)
        if not first.startswith(GZIP_MAGIC):
            while first:
                yield first
                first = f.read(READ_CHUNK)
            return
        z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        data = first
        while data:
            for at in range(0, len(data), PIECE):  # in pieces, so that damage loses only what follows it
                try:
                    out = z.decompress(data[at:at + PIECE])
                except zlib.error as exc:
                    raise CorruptLog(f"{path}: not a readable gzip stream ({exc})") from None
                if out:
                    yield out
                if z.eof:  # a clean end; a second stream would be another writer's, which never happens
                    return
            data = f.read(READ_CHUNK)
