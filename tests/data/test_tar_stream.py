"""mmcl.data.tar_stream against webdataset's tarfile_to_samples: the same samples (keys, fields, bytes,
order) from writer shards, long names (PAX, GNU, ustar prefix), PAX headers read here and by tarfile, odd
members, compressed and damaged tars; one error naming the URL for every damaged shard."""

import gzip
import io
import json
import random
import re
import tarfile
from pathlib import Path
from typing import List, Optional, Tuple

import pytest
import torch
import webdataset as wds

from data_prep.writer import ShardSetWriter
from mmcl.data import InputSpec, build_eval_loader
from mmcl.data.tar_stream import _byte_sum, _number, tar_members, tar_samples

LONG_DIR = "set.v2/" + "deeply_nested_folder_of_drawings/" * 3  # dots in a directory name, over 100 characters


OTHER_MEMBERS = {"directory": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                 "fifo": tarfile.FIFOTYPE}  # fmt: skip


def tar_bytes(members: List[Tuple[str, object]], format: int = tarfile.USTAR_FORMAT, mtime: float = 0) -> bytes:
    """A tar of (name, bytes) files, or (name, a kind of OTHER_MEMBERS) for other members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            if isinstance(content, bytes):
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                info.type = OTHER_MEMBERS[content]  # type: ignore[index]
                info.linkname = "k0.png" if content in ("symlink", "hardlink") else ""
                tar.addfile(info)
    return buffer.getvalue()


def samples_of(*contents: bytes, tmp_path: Path) -> list:
    """Each way of reading shards holding these bytes: (samples, errors) of webdataset's tarfile_to_samples,
    then of tar_samples."""
    urls = []
    for i, content in enumerate(contents):
        path = tmp_path / f"{i:06d}.tar"
        path.write_bytes(content)
        urls.append(str(path))
    return [read(stage, urls) for stage in (lambda handler: wds.tarfile_to_samples(handler=handler), tar_samples)]


def read(stage, urls: List[str]) -> Tuple[list, List[Exception]]:
    errors: List[Exception] = []

    def go_on(error: Exception) -> bool:
        errors.append(error)
        return True

    return list(stage(go_on)([{"url": url} for url in urls])), errors


def plain_shard(prefix: str = "k", count: int = 4) -> bytes:
    return tar_bytes(
        [(f"{prefix}{i}.{ext}", bytes([i]) * (300 + 7 * i)) for i in range(count) for ext in ("png", "txt")]
    )


def member_offsets(content: bytes) -> List[int]:
    return [member.offset for member in tarfile.open(fileobj=io.BytesIO(content))]


def fix_checksum(content: bytearray, at: int) -> None:
    header = content[at : at + 512]
    content[at + 148 : at + 156] = b"%06o\0 " % (sum(header[:148]) + 256 + sum(header[156:]))


def test_writer_shards_read_as_webdataset_reads_them(tmp_path, digit_pngs):
    with ShardSetWriter(tmp_path / "set", 7) as writer:
        for i, (png, label) in enumerate(digit_pngs[:20]):
            writer.write({"__key__": f"s{i:03d}", "png": png, "txt": f"digit {label}", "cls": label, "json": {"i": i}})
    shards = [path.read_bytes() for path in sorted((tmp_path / "set").glob("*.tar"))]
    (theirs, their_errors), (ours, our_errors) = samples_of(*shards, tmp_path=tmp_path)
    assert ours == theirs and len(ours) == 20 and not our_errors and not their_errors
    assert ours[3]["png"] == digit_pngs[3][0] and json.loads(ours[3]["json"]) == {"i": 3}


@pytest.mark.parametrize("format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_read_as_webdataset_reads_them(tmp_path, format):
    """PAX and GNU long names are handed to tarfile from the first such header on; ustar's prefix (names up
    to 255 characters) is joined here. Plain members before and after the long ones."""
    long_name = LONG_DIR + "drawing.01"
    members = [("first.png", b"a"), ("first.txt", b"b"), (long_name + ".png", b"c" * 700), (long_name + ".txt", b"d")]
    members += [("last.png", b"e"), ("last.txt", b"f")]
    if format != tarfile.USTAR_FORMAT:
        members += [(LONG_DIR * 3 + "longer.png", b"g"), ("caf\xe9.png", b"h")]  # over ustar's limit; not ASCII
    (theirs, their_errors), (ours, our_errors) = samples_of(tar_bytes(members, format), tmp_path=tmp_path)
    assert ours == theirs and not our_errors and not their_errors
    assert [s["__key__"] for s in ours][:3] == ["first", LONG_DIR + "drawing", "last"]
    assert ours[1]["01.png"] == b"c" * 700  # the key ends at the first dot of the file name, as webdataset's


def test_fractional_mtimes_give_pax_headers_to_every_member(tmp_path):
    members = [(f"k{i}.{ext}", bytes([i]) * 10) for i in range(3) for ext in ("png", "txt")]
    (theirs, _), (ours, our_errors) = samples_of(tar_bytes(members, tarfile.PAX_FORMAT, mtime=0.5), tmp_path=tmp_path)
    assert ours == theirs and len(ours) == 3 and not our_errors


def pax_tar(pax_headers: dict, global_headers: Optional[dict] = None) -> bytes:
    """Three samples; k1.png with these PAX records. Under a PAX size its header's own size is 0, as a
    writer puts it for a file over ustar's 8 GiB."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, pax_headers=global_headers) as tar:
        for i, ext in [(i, ext) for i in range(3) for ext in ("png", "txt")]:
            info, data = tarfile.TarInfo(f"k{i}.{ext}"), bytes([i]) * (100 + i)
            info.size = len(data)
            if (i, ext) == (1, "png"):
                info.pax_headers = pax_headers
            tar.addfile(info, io.BytesIO(data))
    content = bytearray(buffer.getvalue())
    if pax_headers.get("size", "").isdigit():
        header = tarfile.open(fileobj=io.BytesIO(bytes(content))).getmembers()[2].offset_data - 512
        content[header + 124 : header + 136] = b"%011o\0" % 0
        fix_checksum(content, header)
    return bytes(content)


@pytest.mark.parametrize(
    "records, samples",
    [
        ({"size": "101", "comment": "read here"}, 3),
        ({"path": "renamed.d/x1.png", "mtime": "1.5"}, 4),
        ({"SCHILY.xattr.user.note": "read by tarfile"}, 3),
        ({"hdrcharset": "BINARY", "path": "k1.png"}, 3),
        ({"size": "0x65"}, 2),  # tarfile reads a size of 0, then k1.png's data as the next header: the end
        ({"GNU.sparse.map": "0,101", "GNU.sparse.size": "200"}, 3),  # a sparse file: its holes read as zeros
    ],
)
def test_pax_headers_read_as_tarfile_reads_them(tmp_path, records, samples):
    """The first three records are read here, the others by tarfile; the second shard starts with a
    global PAX header (tarfile's too)."""
    (theirs, _), (ours, our_errors) = samples_of(pax_tar(records), pax_tar({"comment": "x"}, {"comment": "global"}),
                                                 tmp_path=tmp_path)  # fmt: skip
    assert ours == theirs and len(ours) == samples + 3 and not our_errors


def test_a_malformed_pax_header_or_one_at_the_end_reads_as_tarfile_reads_it(tmp_path):
    malformed = re.sub(rb"\d+ comment=a note", b"99 comment=a note", pax_tar({"comment": "a note"}))
    assert malformed != pax_tar({"comment": "a note"})
    pax_last = pax_tar({"comment": "a note"})
    end = member_offsets(pax_last)[2] + 1024  # after k1.png's PAX header and its records
    (theirs, their_errors), (ours, our_errors) = samples_of(malformed, pax_last[:end] + bytes(1024), tmp_path=tmp_path)
    assert ours == theirs and len(ours) == 4 and len(our_errors) == len(their_errors) == 1


def test_directories_links_metadata_empty_files_and_odd_names(tmp_path):
    members = [
        ("set.v1", "directory"),
        ("set.v1/k0.png", b"png0"),
        ("set.v1/k0.txt", b""),  # zero length: an empty field, not a missing one
        ("set.v1/k0.JSON", b"{}"),  # webdataset lower-cases extensions
        ("set.v1/link.png", "symlink"),
        ("set.v1/hard.png", "hardlink"),
        ("set.v1/fifo.png", "fifo"),
        ("__meta__", b"skipped by webdataset"),
        ("__index__/k1.png", b"skipped too"),
        ("K1.Tar.GZ", b"mixed case"),
        ("sample.with.dots.png", b"x"),
        ("noextension", b"dropped: no key"),
    ]
    (theirs, _), (ours, our_errors) = samples_of(tar_bytes(members, tarfile.GNU_FORMAT), tmp_path=tmp_path)
    assert ours == theirs and not our_errors
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in ours] == [
        ("set.v1/k0", ["json", "png", "txt"]),
        ("K1", ["tar.gz"]),
        ("sample", ["with.dots.png"]),
    ]
    assert ours[0]["txt"] == b""


def test_directories_have_no_data_whatever_their_size_field_says(tmp_path):
    """As tarfile reads them: an old-style directory (regular type, name ending in '/') is a directory, and
    no data follows a directory's header even when its size field is not 0."""
    content = bytearray(tar_bytes([("v7/", b""), ("v7/k.png", b"p"), ("dir", "directory"), ("dir/k.png", b"q")]))
    v7_directory, directory = member_offsets(bytes(content))[0], member_offsets(bytes(content))[2]
    content[v7_directory + 156] = 0  # AREGTYPE
    for at in (v7_directory, directory):
        content[at + 124 : at + 136] = b"%011o\0" % 512
        fix_checksum(content, at)
    (theirs, _), (ours, our_errors) = samples_of(bytes(content), tmp_path=tmp_path)
    assert ours == theirs and [s["__key__"] for s in ours] == ["v7/k", "dir/k"] and not our_errors


def test_a_compressed_shard_is_read_by_tarfile(tmp_path):
    (theirs, _), (ours, our_errors) = samples_of(gzip.compress(plain_shard()), plain_shard("m"), tmp_path=tmp_path)
    assert ours == theirs and len(ours) == 8 and not our_errors


@pytest.mark.parametrize("cut", ["inside_data", "inside_padding", "inside_header", "at_header"])
def test_a_shard_cut_short_gives_what_precedes_the_cut_and_one_error_naming_it(tmp_path, cut):
    good = plain_shard()
    header = member_offsets(good)[3]  # k1.txt, 307 bytes
    end = {"inside_data": header + 512 + 100, "inside_padding": header + 512 + 400, "inside_header": header + 100,
           "at_header": header}[cut]  # fmt: skip
    (theirs, _), (ours, our_errors) = samples_of(good[:end], plain_shard("m"), tmp_path=tmp_path)
    assert ours == theirs  # k1 keeps what it got (its png, and its txt unless cut inside it)
    assert [s["__key__"] for s in ours] == ["k0", "k1", "m0", "m1", "m2", "m3"]
    assert len(our_errors) == 1 and our_errors[0].args[-1] == str(tmp_path / "000000.tar")


def test_a_sample_cut_short_is_not_merged_with_the_next_shards_first(tmp_path):
    good = plain_shard()
    cut = good[: member_offsets(good)[3] + 600]  # k1 keeps its png
    (theirs, _), (ours, _) = samples_of(cut, good[member_offsets(good)[3] :], tmp_path=tmp_path)  # from k1.txt on
    assert [(s["__key__"], s["__url__"][-10:], sorted(s)[-1]) for s in ours] == [
        ("k0", "000000.tar", "txt"), ("k1", "000000.tar", "png"), ("k1", "000001.tar", "txt"),
        ("k2", "000001.tar", "txt"), ("k3", "000001.tar", "txt"),
    ]  # fmt: skip
    assert theirs[1]["__key__"] == "k1" and sorted(theirs[1]) == ["__key__", "__url__", "png", "txt"]  # merged


@pytest.mark.parametrize("damage", ["checksum", "size", "first_header"])
def test_a_damaged_header_ends_the_shard_with_one_error_naming_it(tmp_path, damage):
    content = bytearray(plain_shard())
    at = 0 if damage == "first_header" else member_offsets(bytes(content))[4]
    if damage == "size":
        content[at + 124 : at + 136] = b"0000000009x\0"
        fix_checksum(content, at)
    else:
        content[at + 5] ^= 0x01
    (theirs, their_errors), (ours, our_errors) = samples_of(bytes(content), plain_shard("m"), tmp_path=tmp_path)
    assert ours == theirs and [s["__key__"] for s in ours][:2] == (["m0", "m1"] if at == 0 else ["k0", "k1"])
    assert len(our_errors) == 1 and our_errors[0].args[-1] == str(tmp_path / "000000.tar")
    assert len(their_errors) == (1 if at == 0 else 0)  # tarfile ends a shard quietly at a later damaged header


def test_a_checksum_of_signed_bytes_is_accepted(tmp_path):
    content = bytearray(plain_shard())
    at = member_offsets(bytes(content))[2]
    content[at + 1] = 0xE9  # the name "k1.png" becomes "k\xe91.png", a byte above 127
    header = content[at : at + 512]
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 256
    content[at + 148 : at + 156] = b"%06o\0 " % signed
    (theirs, _), (ours, our_errors) = samples_of(bytes(content), tmp_path=tmp_path)
    assert ours == theirs and not our_errors and "k\udce9" in [s["__key__"] for s in ours]


def test_numeric_fields_and_checksums_as_tarfile_reads_them():
    for number in [0, 7, 8**11 - 1, 8**11, 2**40, -1, -(2**40)]:
        for format in (tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
            try:
                field = tarfile.itn(number, 12, format)
            except ValueError:
                continue  # ustar cannot hold it
            assert _number(field) == tarfile.nti(field) == number
    rng = random.Random(0)
    for header in [bytes(512), b"\xff" * 512] + [rng.randbytes(512) for _ in range(20)]:
        assert _byte_sum(header) == sum(header)


class Trickle(io.RawIOBase):
    """An unbuffered stream giving at most 7 bytes a read, as a socket or a remote file may."""

    def __init__(self, content: bytes) -> None:
        self.content = io.BytesIO(content)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def, override]
        data = self.content.read(min(7, len(buffer)))
        buffer[: len(data)] = data
        return len(data)


def test_short_reads_are_read_on():
    content = plain_shard()
    assert list(tar_members(Trickle(content), lambda error: False)) == list(
        tar_members(io.BytesIO(content), lambda error: False)
    )


def test_the_stream_counts_a_cut_shard_and_names_it(tmp_path, digit_pngs, caplog):
    with ShardSetWriter(tmp_path, 4) as writer:
        for i, (png, label) in enumerate(digit_pngs[:8]):
            writer.write({"__key__": f"s{i}", "png": png, "txt": f"digit {label}"})
    cut = tmp_path / "000000.tar"
    cut.write_bytes(cut.read_bytes()[: member_offsets(cut.read_bytes())[4]])  # s0, s1 whole; cut at s2's header
    inputs = {
        "image": InputSpec("image", ["png"], lambda image: torch.tensor(image.size)),
        "text": InputSpec("text", ["txt"], lambda text: torch.tensor(len(text))),
    }
    (batch,) = build_eval_loader(f"{tmp_path}/{{000000..000001}}.tar", inputs, batch_size=10)
    assert [key.split("#")[1] for key in batch.keys] == ["s0", "s1", "s4", "s5", "s6", "s7"]
    assert batch.skipped == 1 and f"skipped {cut}: ReadError" in caplog.text
