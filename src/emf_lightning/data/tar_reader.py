"""Reading WebDataset tar shards so that damage costs only the damaged samples.

webdataset's own reader (with `handler=warn_and_continue`) drops the rest of a shard at the first
error, and Python's `tarfile` silently treats a corrupt header in the middle of a stream as the end
of the archive. This reader streams a shard (any URL `webdataset.gopen` opens: local path, `pipe:`,
http), detects every kind of damage (truncated member, truncated or invalid header, a missing
end-of-archive marker) and, after a damaged header, scans forward block by block to the next valid
tar header and carries on, so members after the damage are recovered too.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol

import webdataset as wds

from emf_lightning.data.health import CORRUPT_SHARD, DUPLICATE_ENTRY, UNREADABLE_SHARD, SkipCounter

BLOCK = tarfile.BLOCKSIZE  # 512
_SCAN_CHUNK = 64 * BLOCK
# "dir/key.ext.more" -> ("dir/key", "ext.more"): the key is everything up to the first dot of the basename
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Prepend:
    """A read-only stream that returns `prefix` first, then the rest of `source`."""

    def __init__(self, prefix: bytes, source: _Readable) -> None:
        self._prefix = prefix
        self._source = source

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            out, self._prefix = self._prefix + self._source.read(), b""
            return out
        if not self._prefix:
            return self._source.read(size)
        out, self._prefix = self._prefix[:size], self._prefix[size:]
        if len(out) < size:
            out += self._source.read(size - len(out))
        return out


def split_key(name: str) -> tuple[str | None, str | None]:
    """WebDataset's naming rule: the sample key is the path up to the first dot of the file name."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


def _decompressed(raw: _Readable) -> _Readable:
    """Undo gzip/bzip2/xz compression, recognised by magic bytes (as `tarfile`'s 'r|*' does)."""
    head = raw.read(6)
    stream = _Prepend(head, raw)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[arg-type]
    if head.startswith(b"BZh"):
        return bz2.BZ2File(stream, mode="rb")  # type: ignore[arg-type]
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(stream, mode="rb")  # type: ignore[arg-type]
    return stream


def _is_header(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        return True
    except tarfile.HeaderError:
        return False


def _seek_next_header(source: _Readable) -> tuple[bytes | None, bool]:
    """Read forward to the next valid tar header block.

    Returns (the stream from that header on, or None at end of data; whether non-zero bytes that are
    not a header were skipped, i.e. damage). Zero blocks are end-of-archive padding, not damage.
    """
    damaged = False
    carry = b""
    while True:
        chunk = source.read(_SCAN_CHUNK)
        data = carry + chunk
        usable = len(data) - len(data) % BLOCK
        for start in range(0, usable, BLOCK):
            block = data[start : start + BLOCK]
            if block.count(0) != BLOCK:
                if _is_header(block):
                    return data[start:], damaged
                damaged = True
        carry = data[usable:]
        if not chunk:
            # a trailing partial block is a cut-off header or data: damage if it holds anything
            return None, damaged or bool(carry.strip(b"\0"))


def iter_tar_members(fileobj: _Readable, on_damage: Callable[[str], None]) -> Iterator[tuple[str, bytes]]:
    """Yield (name, data) for every regular file readable in a (possibly compressed) tar stream.

    `on_damage(description)` is called for each damaged stretch; reading resumes at the next valid
    header when there is one. Errors of the decompressor (e.g. truncated gzip) end the stream.
    """
    source: _Readable = _decompressed(fileobj)
    first = source.read(BLOCK)
    if not first:
        on_damage("empty file")
        return
    source = _Prepend(first, source)
    prefix, damaged = _seek_next_header(source)
    if damaged:
        on_damage("no valid tar header at the start")
    while prefix is not None:
        tar = tarfile.open(fileobj=_Prepend(prefix, source), mode="r|")  # type: ignore[call-overload]
        stream = tar.fileobj  # tarfile's internal buffered stream; the rest of the shard is read from it
        try:
            for info in tar:
                if info.isreg():
                    data = tar.extractfile(info).read()  # type: ignore[union-attr]
                    yield info.name, data
                tar.members = []  # streaming: do not keep every TarInfo of a large shard in memory
        except (tarfile.TarError, EOFError) as exn:
            on_damage(f"{type(exn).__name__}: {exn}")
            return
        # tarfile stops silently at a zero block (clean end), an invalid header or the end of data.
        # How much of the next header it read tells them apart.
        consumed = stream.pos - tar.offset
        if consumed == 0:
            on_damage("data ends without an end-of-archive marker (truncated)")
            return
        if consumed < BLOCK:
            on_damage("data ends inside a tar header (truncated)")
            return
        prefix, damaged = _seek_next_header(stream)
        if damaged:
            on_damage(
                "damaged bytes between members" + ("; reading resumed at the next header" if prefix is not None else "")
            )


def iter_shard_samples(url: str, counter: SkipCounter, opener: Callable[[str], BinaryIO] = wds.gopen) -> Iterator[dict]:
    """Group the members of one shard into WebDataset samples: {"__key__", "__url__", ext: bytes}.

    An unreadable shard is counted and yields nothing; a damaged one is counted once and yields every
    sample that could be read. A sample cut by damage is yielded with what it has; the decoder judges it.
    """
    try:
        fileobj = opener(url)
    except Exception as exn:  # any failure to open (missing file, http error, failing pipe)
        counter.skip(UNREADABLE_SHARD, f"{url}: {type(exn).__name__}: {exn}")
        return
    damage: list[str] = []
    current: dict | None = None
    failed = False
    try:
        for name, data in iter_tar_members(fileobj, damage.append):
            key, ext = split_key(name)
            if key is None or key.startswith("__"):  # no extension, or webdataset metadata (__meta__)
                continue
            ext = ext.lower()  # type: ignore[union-attr]
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            if ext in current:
                counter.skip(DUPLICATE_ENTRY, f"{url}: {name} appears twice")
                continue
            current[ext] = data
    except Exception as exn:  # I/O or decompressor failure
        failed = True
        damage.append(f"{type(exn).__name__}: {exn}")
    finally:
        if not _close_quietly(fileobj):  # a `pipe:` URL whose command failed reports it on close
            failed = True
            damage.append("the stream reported an error on close")
    if failed and current is None:  # an error before a single member: the shard could not be read at all
        counter.skip(UNREADABLE_SHARD, f"{url}: " + "; ".join(damage))
        return
    if current is not None:
        yield current
    if damage:
        counter.skip(CORRUPT_SHARD, f"{url}: " + "; ".join(damage))


def _close_quietly(fileobj: BinaryIO) -> bool:
    """Close; False if closing raised (webdataset's pipes raise there when their command failed)."""
    try:
        fileobj.close()
        return True
    except Exception:
        return False
