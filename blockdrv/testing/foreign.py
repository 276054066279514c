"""Minimal images of formats blockdrv has no driver for, built by hand from
their documented headers -- for the formats qemu-img cannot create (bochs,
cloop, dmg) or not reliably (luks) and, in unit tests that must not need
qemu-img, the rest.

Each builder returns bytes that qemu-img 7.2 itself opens (or at least
probes) as that format; tests/interop/test_probe_interop.py checks that.
"""

from __future__ import annotations

import base64
import struct

CLOOP_PREAMBLE = (b"#!/bin/sh\n#V2.0 Format\n"
                  b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")


def bochs() -> bytes:
    """A growing redolog of 4 KiB: 512-byte header, a one-entry catalog."""
    h = bytearray(512)
    h[0:22] = b"Bochs Virtual HD Image"
    h[32:39] = b"Redolog"
    h[48:55] = b"Growing"
    # version 2.0, header size, catalog entries, bitmap size, extent size
    struct.pack_into("<5I", h, 64, 0x00020000, 512, 1, 1, 4096)
    struct.pack_into("<Q", h, 88, 4096)          # disk size
    return bytes(h) + b"\xff" * 4                 # catalog: extent not allocated


def cloop() -> bytes:
    """cloop v2.0: the shell preamble, then block size, block count and offsets."""
    head = CLOOP_PREAMBLE.ljust(128, b"\0")
    return head + struct.pack(">II", 512, 1) + struct.pack(">QQ", 152, 160) + bytes(8)


def dmg(koly: bool = True) -> bytes:
    """4 KiB of data, an XML plist with one 'mish' block, the 'koly' trailer
    (qemu finds a dmg by its name, then the trailer in the last 515 bytes)."""
    mish = bytearray(204)
    struct.pack_into(">I", mish, 0, 0x6D697368)
    # chunk: type, reserved, first sector, sector count, offset, length
    mish += struct.pack(">IIQQQQ", 1, 0, 0, 8, 0, 4096)
    mish += struct.pack(">IIQQQQ", 0xFFFFFFFF, 0, 8, 0, 4096, 0)
    xml = b"<plist><dict><data>" + base64.b64encode(bytes(mish)) + b"</data></dict></plist>"
    data = b"\x11" * 4096
    trailer = bytearray(512)
    if koly:
        trailer[0:4] = b"koly"
    struct.pack_into(">QQ", trailer, 0xD8, len(data), len(xml))
    return data + xml + bytes(trailer)


def luks() -> bytes:
    """A LUKS1 header (aes-xts-plain64, sha256) with every key slot disabled,
    laid out as qemu-img lays out its own (slots 504 sectors apart, payload at
    sector 4040).  qemu-img's own luks create benchmarks PBKDF2 against the
    thread CPU clock and fails at random on coarse clocks; this one cannot."""
    h = bytearray(4040 * 512)
    h[0:8] = b"LUKS\xba\xbe\0\x01"
    h[8:11] = b"aes"
    h[40:51] = b"xts-plain64"
    h[72:78] = b"sha256"
    struct.pack_into(">II", h, 104, 4040, 64)        # payload sector, key bytes
    struct.pack_into(">I", h, 164, 1000)             # master key digest iterations
    h[168:204] = b"00000000-0000-4000-8000-000000000000"
    for slot in range(8):
        # disabled, no iterations, no salt, key material offset, stripes
        struct.pack_into(">II", h, 208 + 48 * slot, 0x0000DEAD, 0)
        struct.pack_into(">II", h, 208 + 48 * slot + 40, 8 + 504 * slot, 4000)
    return bytes(h)


def header(fmt: str) -> bytes:
    """A first sector that qemu 7.2's probe for ``fmt`` scores (no more)."""
    sector = bytearray(512)

    def put(off: int, data: bytes) -> bytes:
        sector[off:off + len(data)] = data
        return bytes(sector)

    if fmt == "qcow2":
        return put(0, b"QFI\xfb\0\0\0\x03")
    if fmt == "qcow":
        return put(0, b"QFI\xfb\0\0\0\x01")
    if fmt == "vmdk":
        return put(0, b"KDMV\x01\0\0\0")
    if fmt == "vmdk3":
        return put(0, b"COWD\x01\0\0\0")
    if fmt == "vmdk-descriptor":
        return put(0, b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\n")
    if fmt == "vdi":
        put(0, b"<<< QEMU VM Virtual Disk Image >>>\n")
        return put(0x40, struct.pack("<I", 0xBEDA107F))
    if fmt == "vpc":
        return put(0, b"conectix")
    if fmt == "qed":
        return put(0, b"QED\0")
    if fmt == "parallels":
        return put(0, b"WithoutFreeSpace" + struct.pack("<I", 2))
    if fmt == "parallels-ext":
        return put(0, b"WithouFreSpacExt" + struct.pack("<I", 2))
    if fmt == "luks":
        return put(0, b"LUKS\xba\xbe\0\x01")
    if fmt == "bochs":
        return bochs()
    if fmt == "cloop":
        return cloop()
    raise ValueError(fmt)
