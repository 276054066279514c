"""Format probing that never guesses dangerously.

QEMU probes an image by offering its first sector to every format driver
(``bdrv_probe_all``) and takes the highest score; raw answers 1, so it wins
whenever nobody else claims the image.  blockdrv has far fewer drivers than
qemu-img 7.2, so on its own it would open a qcow2 or vmdk image as raw --
and a write would then destroy it.  :data:`SIGNATURES` lists, one entry per
format qemu-img 7.2 recognises, how its probe function knows the format and
with which score; it is consulted alongside the drivers.  A format that no
registered driver implements is refused (:func:`unsupported`); once a real
driver for it is installed, that driver takes the image over.

:func:`probe_format_name` is also the raw format's guard for block 0 (qemu's
``raw_co_pwritev`` with ``bs->probed``): a probed raw image must not be
written into something that probes as another format.
"""

from __future__ import annotations

import struct
from blockdrv._startup import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from typing import Callable

from .errors import InvalidArgumentError, UnsupportedError

# qemu's BLOCK_PROBE_BUF_SIZE: every probe sees exactly the first 512 bytes,
# zero-padded when the file is shorter (file-posix reads zeros past EOF).
PROBE_BUF_SIZE = 512


class Signature(NamedTuple):
    """How qemu-img 7.2 recognises one format (``block/<name>.c``'s probe)."""

    name: str
    score: int
    match: Callable[[bytes, "str | None"], bool]


def _le32(buf: bytes, off: int) -> int:
    return struct.unpack_from("<I", buf, off)[0]


def _be32(buf: bytes, off: int) -> int:
    return struct.unpack_from(">I", buf, off)[0]


def _cstr_is(buf: bytes, off: int, text: bytes) -> bool:
    # strcmp() on a fixed-size field: equal only with the terminating NUL
    return buf[off:off + len(text) + 1] == text + b"\0"


def _qcow_version(buf: bytes) -> int | None:
    return _be32(buf, 4) if buf[:4] == b"QFI\xfb" else None


def _vmdk(buf: bytes, filename) -> bool:
    # Sparse extents carry a magic ("KDMV" = VMDK4, "COWD" = VMDK3/ESX);
    # a text descriptor ("# Disk DescriptorFile" ...) is recognised as
    # vmdk_probe does: comment lines and lines of spaces may precede it, and
    # the first other line must be "version=1|2|3" ended by \n or \r\n.
    if buf[:4] in (b"KDMV", b"COWD"):
        return True
    pos, end = 0, len(buf)
    while pos < end:
        ch = buf[pos:pos + 1]
        if ch == b"#":
            nl = buf.find(b"\n", pos)
            pos = end if nl < 0 else nl + 1
            continue
        if ch == b" ":
            while pos < end and buf[pos:pos + 1] == b" ":
                pos += 1
            if buf[pos:pos + 1] == b"\r":
                pos += 1
            if pos == end or buf[pos:pos + 1] != b"\n":
                return False
            pos += 1
            continue
        line = buf[pos:pos + 11]
        return any(line.startswith(b"version=%d%s" % (v, eol))
                   for v in (1, 2, 3) for eol in (b"\n", b"\r\n"))
    return False


_CLOOP_MAGIC = (b"#!/bin/sh\n#V2.0 Format\n"
                b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")

# Scores are qemu's: 100 for a magic number, 2 for the weak guesses (a
# shell-script preamble, a file name).  qemu 7.2's vpc_probe looks only at
# offset 0, so a fixed VHD (footer at the end only) probes as raw there, and
# here too.  LUKS means LUKS1: qemu 7.2 does not probe LUKS2 headers.
SIGNATURES: tuple[Signature, ...] = (
    Signature("qcow2", 100, lambda b, f: (_qcow_version(b) or 0) >= 2),
    Signature("qcow", 100, lambda b, f: _qcow_version(b) == 1),
    Signature("vmdk", 100, _vmdk),
    Signature("vdi", 100, lambda b, f: _le32(b, 0x40) == 0xBEDA107F),
    Signature("vpc", 100, lambda b, f: b[:8] == b"conectix"),
    Signature("qed", 100, lambda b, f: b[:4] == b"QED\0"),
    Signature("parallels", 100, lambda b, f: b[:16] in (b"WithoutFreeSpace",
                                                        b"WithouFreSpacExt")
              and _le32(b, 16) == 2),
    Signature("bochs", 100, lambda b, f: _cstr_is(b, 0, b"Bochs Virtual HD Image")
              and _cstr_is(b, 32, b"Redolog") and _cstr_is(b, 48, b"Growing")
              and _le32(b, 64) in (0x00010000, 0x00020000)),
    Signature("luks", 100, lambda b, f: b[:6] == b"LUKS\xba\xbe"
              and struct.unpack_from(">H", b, 6)[0] == 1),
    Signature("cloop", 2, lambda b, f: b.startswith(_CLOOP_MAGIC)),
    # dmg_probe trusts the name alone (case-sensitive, more than ".dmg");
    # the "koly" trailer is only looked for when opening (see unsupported()).
    Signature("dmg", 2, lambda b, f: bool(f) and len(f) > 4 and f.endswith(".dmg")),
)


def probe_buffer(data: bytes) -> bytes:
    """``data`` as qemu's probes see it: 512 bytes, zero-padded."""
    return bytes(data[:PROBE_BUF_SIZE]).ljust(PROBE_BUF_SIZE, b"\0")


def match_signature(buf: bytes, filename: str | None) -> tuple[str | None, int]:
    """(format, score) of the best signature in :data:`SIGNATURES`."""
    best, best_score = None, 0
    for sig in SIGNATURES:
        if sig.score > best_score and sig.match(buf, filename):
            best, best_score = sig.name, sig.score
    return best, best_score


def probe(reg, buf: bytes, filename: str | None):
    """(driver, format name, score): the drivers' probe, overruled by a
    signature that scores higher.  ``driver`` is None when the winner is a
    format without a registered driver (or when nothing matched at all)."""
    buf = probe_buffer(buf)
    drv, score = reg.probe(buf, filename)
    name, sig_score = match_signature(buf, filename)
    if name is not None and sig_score > score:
        # A driver registered for the format takes it over, even one whose
        # own probe did not score it; the table only speaks for the absent.
        return reg.formats.get(name), name, sig_score
    return drv, (drv.format_name if drv else None), score


def probe_format_name(reg, buf: bytes) -> str | None:
    """What the first sector ``buf`` would probe as, without a file name
    (qemu's raw write guard calls bdrv_probe_all with filename NULL)."""
    return probe(reg, buf, None)[1]


def unsupported(name: str, file_bs) -> Exception:
    """The error refusing an image in format ``name``, which no driver opens."""
    if name == "dmg" and not _has_koly(file_bs):
        # qemu picks dmg by the name and only then looks for the trailer;
        # without one it refuses the file with this message.
        return InvalidArgumentError("Could not locate UDIF trailer in dmg file")
    return UnsupportedError(f"Image is in {name} format, which blockdrv does not support")


def _has_koly(file_bs) -> bool:
    # The 512-byte UDIF trailer starts with "koly"; dmg files may have odd
    # sizes, so qemu searches the last 515 bytes of the sector-rounded length.
    length = -(-file_bs.total_size // 512) * 512
    if length < 512:
        return False
    start = length - 1023 if length > 1023 else 0
    n = min(length - start, 515)
    tail = bytes(file_bs.pread(start, min(n, max(file_bs.total_size - start, 0))))
    return b"koly" in tail.ljust(n, b"\0")
