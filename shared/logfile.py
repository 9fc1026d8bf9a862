# The on-disk form of a JSON-lines log, written by the host and the guests (shared/log.py) and read back by every
# log tool (apf_emu/logs.py): plain `<stem>.jsonl`, or gzip-compressed `<stem>.<pid>.jsonl.gz`.
#
# Every line must survive a SIGKILL of its writer, so a compressed line is flushed as soon as it is written
# (zlib's Z_SYNC_FLUSH: the deflate stream is byte-aligned after each line and everything written so far can be
# decompressed). A killed writer leaves a member without its gzip trailer, which the reader takes as its end,
# exactly as it takes a cut last line of a plain file. Each writer has a file of its own, named with its pid; should
# a pid come again (a container's), the new writer appends a new gzip member, and the reader goes from a cut member
# on to the next one. The reader tells the formats apart by their first bytes.
#
# The axis: COMPRESSIONS names the formats (`--log-compress`); adding one is a writer class here, its suffix and
# magic bytes, and a branch in `read_chunks`.
from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Final

COMPRESSIONS: Final = ("none", "gzip")
GZIP_MAGIC: Final = b"\x1f\x8b"
GZIP_MEMBER: Final = b"\x1f\x8b\x08"  # a member's start: magic and the deflate method
READ_CHUNK: Final = 1 << 16


def log_path(log_dir: Path, stem: str, compression: str) -> Path:
    """Where one process writes its log: `host.jsonl`, `guest-0.jsonl`, or `host.<pid>.jsonl.gz`."""
    if compression == "none":
        return log_dir / f"{stem}.jsonl"
    if compression == "gzip":
        return log_dir / f"{stem}.{os.getpid()}.jsonl.gz"
    raise ValueError(f"unknown log compression {compression!r}")


APF_EMU_LOG: Final = re.compile(r"(host|guest-\d+|harness)(\.\d+)?\.jsonl(\.gz)?")  # what apf-emu itself writes


def is_log_file(path: Path) -> bool:
    """A file the log tools read from a directory: any JSON-lines log, compressed or not, or a saved *.log."""
    return path.name.endswith((".jsonl", ".jsonl.gz", ".log"))


def log_files(directory: Path, *, apf_emu_only: bool = False) -> list[Path]:
    """The log files in a directory, sorted: every one the tools read, or only those apf-emu writes."""
    return sorted(f for f in directory.iterdir() if f.is_file() and
                  (APF_EMU_LOG.fullmatch(f.name) if apf_emu_only else is_log_file(f)))


class LineWriter:
    """Writes whole lines to a file descriptor, each at once (one write(2)), plainly or through a compressor.

    Compressed, a write that fails or is short (a full disk) would leave the file and the compressor out of step, and
    every later line would decompress wrong: after one, the next line starts a new gzip member, which the reader
    finds again (`read_chunks`); only that line is lost, as a plain file would lose it."""

    __slots__ = ("_compression", "_z", "fd")

    def __init__(self, fd: int, compression: str = "none") -> None:
        self.fd = fd
        self._compression = compression
        self._z = self._new_member()

    def _new_member(self) -> Any:
        if self._compression == "gzip":
            return zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return None

    def write(self, line: bytes) -> None:
        z = self._z
        if z is None:
            os.write(self.fd, line)
            return
        data = z.compress(line) + z.flush(zlib.Z_SYNC_FLUSH)
        try:
            written = os.write(self.fd, data)
        except OSError:
            self._z = self._new_member()
            raise
        if written != len(data):
            self._z = self._new_member()
            raise OSError(f"short write to a compressed log ({written} of {len(data)} bytes)")

    def finish(self) -> None:
        """A clean end: the compressed stream gets its trailer."""
        if self._z is not None:
            os.write(self.fd, self._z.flush(zlib.Z_FINISH))
            self._z = None


def read_chunks(path: str, damage: list[str] | None = None) -> Iterator[bytes]:
    """The bytes of a log file, decompressed if it is compressed (one gzip member after another). A member cut by a
    killed writer ends where it was cut. Where the data is damaged, everything that decompresses before the damage
    is kept, the damage is noted in `damage` ("file: ..."), and reading goes on at the next member, if any."""
    with open(path, "rb") as f:
        data = f.read(READ_CHUNK)
        if not data.startswith(GZIP_MAGIC):
            while data:
                yield data
                data = f.read(READ_CHUNK)
            return
        yield from _gzip_members(f, path, damage)


def _gzip_members(f: BinaryIO, path: str, damage: list[str] | None) -> Iterator[bytes]:
    pos = member_start = member_out = 0  # the next byte to feed; where this member began; what it gave so far
    z = zlib.decompressobj(16 + zlib.MAX_WBITS)
    while True:
        f.seek(pos)
        piece = f.read(READ_CHUNK)
        if not piece:
            return
        try:
            out = z.decompress(piece)
        except zlib.error as exc:
            rest = _salvage(f, member_start, pos, piece)[member_out:]  # up to the damage, byte-exact
            if rest or member_out:
                yield rest + b"\n"  # a line cut by the damage stays a line of its own, apart from the next member
            if damage is not None:
                damage.append(f"{path}: damaged gzip data after byte {pos} ({exc}); read on from the next member")
            nxt = _next_member(f, pos + 1)
            if nxt is None:
                return
            pos = member_start = nxt
            member_out = 0
            z = zlib.decompressobj(16 + zlib.MAX_WBITS)
            continue
        if out:
            member_out += len(out)
            yield out
        if z.eof:  # a member ended cleanly; another may follow (a writer that reopened the file)
            pos += len(piece) - len(z.unused_data)
            member_start, member_out = pos, 0
            z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        else:
            pos += len(piece)


def _salvage(f: BinaryIO, start: int, pos: int, piece: bytes) -> bytes:
    """What the member that starts at `start` decompresses to before the damage inside `piece` (at `pos`): the
    member again up to `pos`, then `piece` a byte at a time. Only when there is damage."""
    z = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = bytearray()
    f.seek(start)
    left = pos - start
    while left > 0:
        chunk = f.read(min(READ_CHUNK, left))
        left -= len(chunk)
        out += z.decompress(chunk)
    for i in range(len(piece)):
        try:
            out += z.decompress(piece[i:i + 1])
        except zlib.error:
            break
    return bytes(out)


def _next_member(f: BinaryIO, frm: int) -> int | None:
    """The offset of the next gzip member's header at or after `frm`, if any."""
    f.seek(frm)
    offset, tail = frm, b""
    while chunk := f.read(READ_CHUNK):
        buf = tail + chunk
        at = buf.find(GZIP_MEMBER)
        if at >= 0:
            return offset - len(tail) + at
        tail = buf[-(len(GZIP_MEMBER) - 1):]
        offset += len(chunk)
    return None
