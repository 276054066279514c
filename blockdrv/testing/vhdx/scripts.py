"""qemu-io scripts and helpers for the VHDX interop tests.

* :func:`edge_script` -- hand-written edge cases placed relative to an image's
  block size and virtual size (unaligned writes, writes spanning blocks, zero
  writes, the last partial block, reads of unallocated blocks);
* :func:`log_wrap_script` -- more allocating writes than a 1 MiB log holds
  (each BAT update is one 8 KiB log entry: 128 fill the log), so the writer
  wraps around the circular log in one session;
* :func:`make_dirty` -- a qemu-made image whose log holds an entry qemu did
  not apply (blkdebug fails the BAT write); :func:`dirty_log_case` makes one
  of the two standard ones (:data:`DIRTY_LOG_CASES`);
* :func:`current_header` / :func:`log_sequences` -- the header in force and
  the log entries of an image file;
* :func:`vhdiinfo_fields` -- libvhdi's ``vhdiinfo`` report as a dict;

``verify_reads``, ``run_blockdrv`` and ``guest_bytes`` are generic: they live in
:mod:`blockdrv.testing.scripts` (re-exported here).
"""

from __future__ import annotations

import os
import random

from ..qemu import _Shadow, qemu_img_create, run_qemu_img, run_qemu_io
from ..scripts import guest_bytes, run_blockdrv, verify_reads  # noqa: F401 (re-exported)

MiB = 1 << 20
# One BAT update = descriptor sector + one data sector = 8 KiB of log.
LOG_ENTRY_SIZE = 8192


def _fit(size: int, start: int, length: int) -> tuple[int, int] | None:
    """(start, length) clipped to the image, None if nothing is left."""
    if start < 0 or start >= size:
        return None
    length = min(length, size - start)
    return (start, length) if length > 0 else None


def edge_script(size: int, block_size: int, fresh: bool = True) -> list[str]:
    """Edge cases for an image of ``size`` bytes with ``block_size`` blocks.

    Every write is followed (later in the script) by a verifying read, so the
    tools check data, not only their own report lines.  ``fresh``: the image
    is new (the script starts by reading zeros where it will write).
    """
    bs = block_size
    last_block = (size - 1) // bs * bs          # start of the last (partial) block
    cmds: list[str] = []
    shadow = _Shadow(size)
    ranges: list[tuple[int, int]] = []

    def write(pattern: int, start: int, length: int, zero: bool = False) -> None:
        r = _fit(size, start, length)
        if r is None:
            return
        s, n = r
        cmds.append(f"write -z {s} {n}" if zero else f"write -P 0x{pattern:02x} {s} {n}")
        shadow.paint(s, s + n, pattern)
        ranges.append((s, s + n))

    if fresh:
        cmds += ["read -P 0 0 64k", f"read -P 0 {last_block} {size - last_block}"]
    write(0x11, 1, 3)                           # unaligned, inside sector 0
    write(0x12, 511, 2)                         # crosses a sector boundary
    write(0x13, 4095, 4097)                     # crosses a page boundary
    write(0x14, bs - 700, 1400)                 # spans blocks 0 and 1 (unaligned)
    write(0x15, bs - 512, 2 * 512)              # spans blocks 0 and 1 (aligned)
    write(0x16, bs + bs // 2, bs + 4096)        # spans blocks 1 -> 2 -> 3
    write(0, 2 * bs + 1000, 3000, zero=True)    # zero write into allocated data
    write(0, 4 * bs + 512, 8192, zero=True)     # zero write to an unallocated block
    write(0x17, size - 512, 512)                # the last sector
    write(0x18, size - 1, 1)                    # the last byte (unaligned RMW)
    write(0x19, last_block, 4096)               # start of the last partial block
    write(0x1a, size // 2 + 7, 777)             # middle, odd offset and length
    for s, e in ranges:                         # verify what the guest must read
        for seg_s, seg_e, value in shadow.segs:
            lo, hi = max(s, seg_s), min(e, seg_e)
            if lo < hi:
                cmds.append(f"read -P 0x{value:02x} {lo} {hi - lo}")
    # reads of unallocated blocks (block 4 is allocated by the zero write
    # only if the driver allocates for zeros, which qemu does)
    for start in (6 * bs, size - 3 * bs, size // 3):
        r = _fit(size, start, min(bs, 1 << 20))
        if r:
            cmds.append(f"read {r[0]} {r[1]}")
    cmds += [f"read -v {max(0, size - 16)} 16", "read -v 0 16", "flush",
             f"write -P 0x1b {size - 512} 1024",   # crosses the end: fails on both
             f"read {size} 512", "length", "map"]
    return cmds


def log_wrap_script(size: int, block_size: int, writes: int = 200,
                    seed: int = 0) -> list[str]:
    """``writes`` allocating writes (one per block, shuffled) and reads back.

    With a 1 MiB log and more than 128 allocating writes, the circular log
    wraps within the session.
    """
    blocks = -(-size // block_size)
    if blocks < writes:
        raise ValueError(f"{blocks} blocks cannot take {writes} allocating writes")
    rng = random.Random(seed)
    order = rng.sample(range(blocks), writes)
    cmds, written = [], []
    for i, b in enumerate(order):
        start = b * block_size + rng.randrange(0, 64) * 512
        length = min(rng.choice((512, 4096, 65536, 3000)), size - start)
        pattern = (i % 254) + 1
        cmds.append(f"write -P 0x{pattern:02x} {start} {length}")
        written.append((start, length, pattern))
        if i % 50 == 49:
            cmds.append("flush")
    for start, length, pattern in written[::7]:
        cmds.append(f"read -P 0x{pattern:02x} {start} {length}")
    return cmds


def current_header(path):
    """``(index, VhdxHeader)`` of the header in force in an image file."""
    from ...drivers.vhdx.header import select_current_header
    with open(path, "rb") as f:
        f.seek(64 * 1024)
        h1 = f.read(4096)
        f.seek(128 * 1024)
        h2 = f.read(4096)
    return select_current_header(h1, h2)


def log_sequences(path) -> list[tuple[int, int]]:
    """(file offset, sequence number) of every log entry header in the
    current header's log, in file order: a log that wrapped shows a drop."""
    import struct
    header = current_header(path)[1]
    with open(path, "rb") as f:
        f.seek(header.log_offset)
        log = f.read(header.log_length)
    return [(header.log_offset + off, struct.unpack_from("<Q", log, off + 16)[0])
            for off in range(0, len(log), 4096) if log[off:off + 4] == b"loge"]


def make_dirty(directory, name: str, size: str, block_size: str, writes: list[str],
               bat_sector: int) -> str:
    """qemu leaves an un-replayed log: EIO on the first write touching ``bat_sector``.

    ``qemu-img create`` makes ``directory/name``, then qemu-io runs ``writes``
    through blkdebug, which fails the first write to ``bat_sector`` (in
    512-byte units, blkdebug's ``sector`` filter) -- after the log entry was
    written and flushed, before the BAT update landed.  The last of
    ``writes`` must be the one whose BAT update fails.  Returns the path.
    """
    img = os.path.join(os.fspath(directory), name)
    conf = img + ".blkdebug"
    with open(conf, "w") as f:
        f.write('[inject-error]\nevent = "pwritev"\n'
                f'sector = "{bat_sector}"\nerrno = "5"\nonce = "on"\n')
    qemu_img_create(img, "vhdx", size, block_size=block_size)
    rc, out, err = run_qemu_io(f"blkdebug:{conf}:{img}", writes, "vhdx")
    assert "Input/output error" in out + err, (rc, out, err)
    rc, out, err = run_qemu_img("info", img)
    assert rc != 0 and "needs to be replayed" in err, (rc, out, err)
    assert current_header(img)[1].has_log
    return img


# name -> (make_dirty arguments, guest offset of the 64 KiB of 0xab that the
# pending entry makes readable).  "wrapped": 129 BAT updates fill the 1 MiB
# ring (8 KiB each) and wrap to offset 0; the 130th (block 512: BAT sector
# 0x201000 = 512-byte sector 4104) fails.  The ring then holds the active
# entry among stale ones with other GUIDs.
DIRTY_LOG_CASES = {
    "simple": (dict(size="64M", block_size="1M", writes=["write -P 0xab 0 64k"],
                    bat_sector=4096), 0),
    "wrapped": (dict(size="1G", block_size="1M",
                     writes=[f"write -P {i % 250 + 1} {i}M 4k" for i in range(129)]
                     + ["write -P 0xab 512M 64k"], bat_sector=4104), 512 * MiB),
}


def dirty_log_case(directory, case: str) -> tuple[str, int]:
    """``make_dirty`` for one of :data:`DIRTY_LOG_CASES` -> (path, offset of
    the 64 KiB of 0xab the pending log entry holds)."""
    kwargs, offset = DIRTY_LOG_CASES[case]
    return make_dirty(directory, f"{case}.vhdx", **kwargs), offset


def vhdiinfo_fields(path, vhdiinfo: str = "vhdiinfo") -> dict[str, str]:
    """``vhdiinfo PATH`` (libvhdi) as ``{field: value}``, e.g. ``"Disk type":
    "Dynamic"``, ``"Media size": "10 MiB (10486272 bytes)"``; asserts exit 0."""
    import re
    import subprocess
    res = subprocess.run([vhdiinfo, os.fspath(path)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    fields = {}
    for line in res.stdout.splitlines():
        m = re.match(r"\s+([^:]+?)\s*:\s*(.*)$", line)
        if m:
            fields[m.group(1)] = m.group(2)
    return fields


__all__ = ["edge_script", "log_wrap_script", "current_header", "log_sequences", "verify_reads",
           "make_dirty", "DIRTY_LOG_CASES", "dirty_log_case", "run_blockdrv", "vhdiinfo_fields",
           "guest_bytes",
           "LOG_ENTRY_SIZE"]
