"""Shard URLs -> samples: webdataset's `tarfile_to_samples`, with the tar headers read here.

Python's `tarfile` builds a TarInfo of some twenty fields from each 512-byte header; for shards of small
files (a tiny PNG, its caption, its label) that was a large share of a loader worker's time. This stage
reads from each ustar header only what the samples need: the name (with the ustar prefix), the size
(octal or base-256), the type and the checksum, which is verified; and from a PAX header for the member
after it (one per file where writers keep fractional modification times) its path and size. Shards
are opened by webdataset's `url_opener` (so `pipe:` and fsspec URLs open as before) and members are
grouped into samples by its `group_by_keys` (so keys, fields and order are webdataset's).

What this reader does not parse it hands to tarfile, through webdataset's own member iterator, from that
header to the end of the shard: global PAX headers ('g'), PAX headers with other keywords than those
listed below (sparse files, a header charset, vendors' own), GNU long names ('L', 'K') and any other
type, and a first header that is not a plain tar header (a compressed shard, an empty or foreign
file: tarfile then raises the error webdataset always reported).

An unreadable shard (cut short, a header failing its checksum, a size that is not a number) is reported
once to the `handler` (webdataset's protocol: the error's last argument is the shard's URL; True goes on
to the next shard) after the members before the fault. Where tarfile ends a shard quietly at a damaged
or missing header in its middle, and so loses the rest unnoticed, this reader reports it.
"""

from __future__ import annotations

import re
import tarfile
import zlib
from typing import IO, Callable, Dict, Iterable, Iterator, Optional, Tuple

from webdataset.tariterators import group_by_keys, tar_file_iterator, url_opener

Handler = Callable[[Exception], bool]

BLOCK = 512
END_OF_ARCHIVE = bytes(BLOCK)  # tarfile stops at the first all-zero header, and so does this reader
REGULAR = frozenset({b"0", b"\0", b"7"})  # tarfile's regular files (contiguous files, '7', are regular too)
# Hard and symbolic links, devices, directories, FIFOs: tarfile reads no data after their headers, whatever
# their size field says.
WITHOUT_DATA = frozenset({b"1", b"2", b"3", b"4", b"5", b"6"})
PLAIN = REGULAR | WITHOUT_DATA
# A PAX extended header ('x'): records for the member after it. Writers add one to every member whose
# modification time has a fraction (webdataset's TarWriter by default), so shards of small files hold as
# many as files: they are read here when all their keywords are below, else by tarfile.
PAX = b"x"
PAX_APPLIED = frozenset({"path", "size"})
# Keywords the samples do not use (the member's times, owner, link target, a comment): skipped here.
PAX_IGNORED = frozenset({"mtime", "atime", "ctime", "uid", "gid", "uname", "gname", "linkpath", "comment"})
# webdataset's tar_file_iterator skips members named like "__meta__" or "__meta__/...".
WEBDATASET_META = re.compile(r"__[^/]*__($|/)")


def tar_samples(handler: Handler) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """The pipeline stage of `wds.tarfile_to_samples(handler=handler)`: dicts naming a shard `url` ->
    samples {"__key__", "__url__", extension: bytes, ...}."""

    def samples(shards: Iterable[dict]) -> Iterator[dict]:
        return group_by_keys(_shard_files(url_opener(shards, handler=handler), handler), handler=handler)

    return samples


def _shard_files(opened: Iterable[dict], handler: Handler) -> Iterator[dict]:
    """Each shard's files as webdataset's tar_file_expander gives them ({"fname", "data", "__url__"}), then
    {} (group_by_keys's end of a shard). The end marker also follows an unreadable shard, so a sample it
    cut short is not merged with the next shard's first when their keys agree (webdataset's would be)."""
    for source in opened:
        url, local_path = source["url"], source.get("local_path")
        try:
            for name, data in tar_members(source["stream"], handler):
                file = {"fname": name, "data": data, "__url__": url}
                if local_path is not None:
                    file["__local_path__"] = local_path
                yield file
        except Exception as error:
            error.args = error.args + (source.get("stream"), url)  # as webdataset: the URL last
            if not handler(error):
                return
        yield {}


def tar_members(stream: IO[bytes], handler: Handler) -> Iterator[Tuple[str, bytes]]:
    """(name, bytes) of every regular file of a tar stream, in order, as webdataset's tar_file_iterator
    yields them: directories, links, devices and webdataset's "__...__" metadata files are left out.
    Raises tarfile.ReadError, naming the byte offset, where the stream is cut short or a header is damaged."""
    offset = 0
    pax: Optional[Dict[str, bytes]] = None  # the records of a PAX header, for the member after it
    pax_blocks = b""  # that PAX header as read, for tarfile if it has to take over at the member after it
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            header = _read_on(stream, header, BLOCK)
        kind = header[156:157]
        if pax is not None and not (kind in PLAIN and _intact(header)):
            # another PAX or GNU header, or none (tarfile raises its error), after a PAX header
            yield from _rest_by_tarfile(pax_blocks + header, stream, handler)
            return
        if header == END_OF_ARCHIVE:
            return
        if pax is None and not _intact(header):
            if offset == 0:  # not a plain tar: tarfile decompresses it, or raises the error webdataset did
                yield from _rest_by_tarfile(header, stream, handler)
                return
            if not header:
                raise tarfile.ReadError(f"the tar ends at byte {offset} without its end-of-archive block (cut short?)")
            if len(header) < BLOCK:
                raise tarfile.ReadError(f"the tar ends inside the header at byte {offset}")
            raise tarfile.ReadError(f"the header at byte {offset} is damaged (bad checksum)")
        if kind not in PLAIN and kind != PAX:
            yield from _rest_by_tarfile(header, stream, handler)
            return
        size = _size(header[124:136], offset)
        if kind == PAX:
            records = _read_on(stream, b"", size + -size % BLOCK)
            if len(records) < size + -size % BLOCK:
                raise tarfile.ReadError(f"the tar ends inside the PAX header at byte {offset}")
            pax, pax_blocks = _pax_records(records[:size]), header + records
            if pax is None:
                yield from _rest_by_tarfile(pax_blocks, stream, handler)
                return
            offset += len(pax_blocks)
            continue
        name = _string(header[:100])
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"  # a directory, in the old V7 way
        if header[345]:  # ustar splits a long name into a prefix and the name
            name = _string(header[345:500]) + "/" + name
        if pax is not None:  # as tarfile applies a PAX header to the member after it
            name = pax["path"].decode("utf-8", "surrogateescape").rstrip("/") if "path" in pax else name
            size = int(pax["size"]) if "size" in pax else size
            pax = None
        if kind in WITHOUT_DATA:
            size = 0
        data = stream.read(size)
        if len(data) < size and len(data := _read_on(stream, data, size)) < size:
            raise tarfile.ReadError(f"the tar ends inside {name!r} ({len(data)} of its {size} bytes)")
        if kind in REGULAR and not (name.startswith("__") and _webdataset_meta(name)):
            yield name, data
        padding = -size % BLOCK
        skipped = stream.read(padding)
        if len(skipped) < padding and len(_read_on(stream, skipped, padding)) < padding:
            raise tarfile.ReadError(f"the tar ends inside the padding after {name!r}")
        offset += BLOCK + size + padding


def _pax_records(data: bytes) -> Optional[Dict[str, bytes]]:
    """The records ("<length> <keyword>=<value>" and a newline) of a PAX extended header, or None when one
    is malformed, has a keyword outside PAX_APPLIED and PAX_IGNORED, or a size that is not a plain number:
    tarfile then reads it, and the rest of the shard."""
    records: Dict[str, bytes] = {}
    at = 0
    while at < len(data):
        space = data.find(b" ", at)
        if space <= at or not data[at:space].isdigit():
            return None
        end = at + int(data[at:space])
        keyword, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not space < end <= len(data) or data[end - 1] != 0x0A or not equals:
            return None
        name = keyword.decode("utf-8", "surrogateescape")
        if name not in PAX_APPLIED and name not in PAX_IGNORED:
            return None
        records[name] = value
        at = end
    if "size" in records and not records["size"].isdigit():
        return None
    return records


def _intact(header: bytes) -> bool:
    """Whether the header's checksum holds: the sum of its bytes, the checksum field read as 8 spaces (256).
    tarfile also accepts the sum of signed bytes, which some old writers stored."""
    if len(header) < BLOCK:
        return False
    try:
        stored = _number(header[148:156])
    except ValueError:
        return False
    unsigned = _byte_sum(header) - sum(header[148:156]) + 256
    if stored == unsigned:
        return True
    high_bytes = sum(byte >= 0x80 for byte in header[:148] + header[156:])
    return stored == unsigned - 256 * high_bytes


def _byte_sum(header: bytes) -> int:
    """sum(header), 7 times faster: Adler-32's first half is 1 + the sum of the bytes modulo 65521, and the
    sum of 256 bytes (at most 65280) is below the modulus, so each half's sum comes out exactly."""
    return (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - 2


def _size(field: bytes, offset: int) -> int:
    try:
        size = _number(field)
    except ValueError:
        raise tarfile.ReadError(f"the header at byte {offset} has no valid size") from None
    if size < 0:
        raise tarfile.ReadError(f"the header at byte {offset} has a negative size")
    return size


def _number(field: bytes) -> int:
    """A numeric header field as tarfile's nti reads it: NUL-terminated octal digits, or base-256 (GNU's
    encoding of numbers too large for the field) behind a first byte of 0x80 (positive) or 0xff (negative)."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    if field[0] == 0xFF:
        return int.from_bytes(field[1:], "big") - 256 ** (len(field) - 1)
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _string(field: bytes) -> str:
    """A NUL-terminated name as tarfile decodes it in a stream (its default encoding; undecodable bytes kept)."""
    return field.split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")


def _webdataset_meta(name: str) -> bool:
    return ("/" not in name and name.startswith("__") and name.endswith("__")) or bool(WEBDATASET_META.match(name))


def _read_on(stream: IO[bytes], data: bytes, size: int) -> bytes:
    """`data` and what follows it up to `size` bytes, fewer only at the stream's end: a pipe or a remote file
    may return less than asked before its end."""
    while len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return data


def _rest_by_tarfile(header: bytes, stream: IO[bytes], handler: Handler) -> Iterator[Tuple[str, bytes]]:
    """The members from `header` (already read) to the end of the stream, read by tarfile through
    webdataset's member iterator: its errors, its handling of PAX and GNU headers, its compressions."""
    for member in tar_file_iterator(_Replay(header, stream), handler=handler):
        yield member["fname"], member["data"]


class _Replay:
    """A read-only stream that gives `head` again before the rest of `stream`."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data + self.stream.read(size - len(data)) if len(data) < size else data

    def __repr__(self) -> str:
        return repr(self.stream)
