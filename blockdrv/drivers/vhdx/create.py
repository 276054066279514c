"""``create -f vhdx``, reproducing qemu-img 7.2 byte for byte.

qemu's layout (offsets in MiB)::

    0  file id (+creator), header 1 @64K, header 2 @128K, region tables @192K/256K
    1  log (log_size)
    1+log           BAT (entries * 8 rounded up to 1 MiB)
    after BAT       metadata region (1 MiB): table, items at +64K
    BAT end + 5 MiB first payload offset = file length (dynamic);
                    fixed images add the virtual size (not rounded to a block)

Region entries carry Required=0 (qemu's choice); header 2's sequence number is
header 1's plus one; the log GUID is zero; BAT: see _bat_slices.

Everything is validated before the first write, so a failed create leaves
nothing for the caller to clean up beyond the (empty) file it made.
Option strings are parsed by blockdrv.options against CREATE_OPTS; the
functions here take typed values (None = option not given).
"""

from __future__ import annotations

import os
from blockdrv._startup import dataclass

from blockdrv.errors import InvalidArgumentError
from blockdrv.options import CreateOption

from . import bat as _bat
from .constants import (BAT_GUID, BLOCK_SIZE_MAX, DEFAULT_LOG_SIZE, FILE_ID_OFFSET, GiB,
                        HEADER1_OFFSET, HEADER2_OFFSET, HEADER_SECTION_SIZE, MAX_VIRTUAL_SIZE,
                        METADATA_GUID, METADATA_TABLE_SIZE, MiB, PAYLOAD_BLOCK_FULLY_PRESENT,
                        PAYLOAD_BLOCK_ZERO, REGION_TABLE_OFFSETS, SECTOR_SIZES, TiB, new_guid,
                        round_up)
from .header import FileIdentifier, Header
from .metadata import DiskParameters, build_metadata
from .region import RegionEntry, RegionTable

DEFAULT_CREATOR = "blockdrv"
METADATA_REGION_LENGTH = 1 * MiB   # qemu: "min size, and more than enough"
DATA_GAP = 5 * MiB                 # qemu leaves 5 MiB after the BAT before payload


# Same order, types, help and defaults as qemu 7.2's vhdx_create_opts
# (`qemu-img create -f vhdx -o help` prints them sorted by name).  ``default``
# mirrors qemu's def_value_str, i.e. what its "Formatting ..." line shows.
CREATE_OPTS = [
    CreateOption("size", "size", "Virtual disk size; max of 64TB."),
    CreateOption("log_size", "size", "Log size; min 1MB.", DEFAULT_LOG_SIZE),
    CreateOption("block_size", "size",
                 "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.", 0),
    CreateOption("subformat", "string",
                 "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'."),
    CreateOption("block_state_zero", "bool",
                 "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  "
                 "Do not set to 'off' when using 'qemu-img convert' with subformat=dynamic."),
    # beyond qemu: Hyper-V's 4K-native disks
    CreateOption("logical_sector_size", "size",
                 "Logical sector size, 512 or 4096 (qemu can only create 512). Default 512."),
    CreateOption("physical_sector_size", "size",
                 "Physical sector size, 512 or 4096. Default: the logical sector size."),
    # beyond qemu: differencing images (qcow2's names and help texts)
    CreateOption("backing_file", "string", "File name of a base image"),
    CreateOption("backing_fmt", "string", "Image format of the base image"),
]


@dataclass(frozen=True)
class VhdxLayout:
    """Everything create decides before writing (also handy for tests and info)."""
    virtual_size: int
    block_size: int
    logical_sector_size: int
    physical_sector_size: int
    fixed: bool
    block_state_zero: bool
    log_offset: int
    log_size: int
    bat_offset: int
    bat_length: int
    bat_entries: int
    metadata_offset: int
    metadata_length: int
    data_offset: int
    file_length: int


def auto_block_size(size: int) -> int:
    """qemu's automatic block size, chosen to keep the BAT small."""
    if size > 32 * TiB:
        return 64 * MiB
    if size > 100 * GiB:
        return 32 * MiB
    if size > 1 * GiB:
        return 16 * MiB
    return 8 * MiB


def _qemu_empty_disk_entries(block_size: int, lss: int) -> int:
    """BAT entries qemu 7.2 computes for a 0-byte disk.

    Its uint32 ``data_blocks - 1`` underflows, so it sizes the BAT region for
    ``0xFFFFFFFF >> log2(chunk_ratio)`` entries (64 MiB with 8 MiB blocks) and
    its reader refuses a smaller region.  A region larger than the entries
    need is valid per spec 2.5, so we keep that length to stay readable by
    qemu -- but write none of it (there are no entries), where qemu writes
    64 MiB of zeros, or fails outright with 256 MiB blocks (2 GiB BAT).
    """
    return 0xFFFFFFFF >> (_bat.chunk_ratio(block_size, lss).bit_length() - 1)


def plan_vhdx(size: int, *, subformat: str | None = "dynamic", block_size: int = 0,
              log_size: int | None = DEFAULT_LOG_SIZE, block_state_zero: bool | None = True,
              logical_sector_size: int | None = 512,
              physical_sector_size: int | None = None,
              differencing: bool = False) -> VhdxLayout:
    """Validate and round the options exactly as qemu-img 7.2; no I/O.

    ``differencing``: the BAT holds whole chunks (spec 2.5)."""
    subformat = "dynamic" if subformat is None else subformat
    if subformat not in ("dynamic", "fixed"):
        raise InvalidArgumentError(f"Parameter 'subformat' does not accept value '{subformat}'")
    block_state_zero = True if block_state_zero is None else bool(block_state_zero)
    lss = 512 if logical_sector_size is None else logical_sector_size
    pss = lss if physical_sector_size is None else physical_sector_size
    if lss not in SECTOR_SIZES:
        raise InvalidArgumentError("Logical sector size must be 512 or 4096")
    if pss not in SECTOR_SIZES:
        raise InvalidArgumentError("Physical sector size must be 512 or 4096")
    if not isinstance(size, int) or size < 0:
        raise InvalidArgumentError("Image size must be a non-negative integer")

    # qemu silently rounds: size up to a sector (512; we use the logical
    # sector so 4K disks stay valid), log and block size up to 1 MiB, the
    # block size down to 256 MiB; block_size 0 means automatic.
    size = round_up(size, lss)
    if size > MAX_VIRTUAL_SIZE:
        raise InvalidArgumentError("Image size too large; max of 64TB")
    log_size = round_up(DEFAULT_LOG_SIZE if log_size is None else log_size, MiB)
    if log_size > 0xFFFFFFFF:
        raise InvalidArgumentError("Log size must be smaller than 4 GB")
    if log_size < MiB:
        raise InvalidArgumentError("Log size must be a multiple of 1 MB")
    block_size = min(round_up(block_size or 0, MiB), BLOCK_SIZE_MAX) or auto_block_size(size)
    if block_size & (block_size - 1):
        raise InvalidArgumentError("Block size must be a power of two")

    entries = _bat.total_entries(size, block_size, lss, differencing=differencing)
    bat_offset = HEADER_SECTION_SIZE + log_size
    bat_length = _bat.region_length(entries or _qemu_empty_disk_entries(block_size, lss))
    metadata_offset = bat_offset + bat_length
    data_offset = bat_offset + bat_length + DATA_GAP
    fixed = subformat == "fixed"
    return VhdxLayout(size, block_size, lss, pss, fixed, block_state_zero,
                      HEADER_SECTION_SIZE, log_size, bat_offset, bat_length, entries,
                      metadata_offset, METADATA_REGION_LENGTH, data_offset,
                      data_offset + (size if fixed else 0))


def _bat_slices(layout: VhdxLayout, step: int = 1 << 20):
    """(file offset, bytes) pieces of the BAT to write; nothing when it is all
    zeros (the file is fresh; qemu skips it too, except for size 0).

    A table of one state repeats every ``chunk_ratio + 1`` entries (payload
    entries, then a NOT_PRESENT sector bitmap entry): one ~1 MiB pattern of
    whole periods is built once and written again and again.  Only a fixed
    image without ZERO blocks has per-entry offsets; that table is built
    ``step`` entries at a time (numpy, imported then).  A 64 TiB disk in
    1 MiB blocks has a 513 MiB BAT, which is never held whole.
    """
    if layout.fixed and not layout.block_state_zero:
        yield from _present_bat_slices(layout, step)
        return
    if not layout.block_state_zero:
        return
    # qemu uses ZERO for fixed images too, leaving their space unused
    ratio = _bat.chunk_ratio(layout.block_size, layout.logical_sector_size)
    period = PAYLOAD_BLOCK_ZERO.to_bytes(8, "little") * ratio + bytes(8)
    total = layout.bat_entries * 8
    # no longer than the table: a small image's BAT is a few KiB, and an
    # 8 MiB pattern cost more than the rest of its creation
    pattern = period * max(1, -(-min(step * 8, total) // len(period)))
    for pos in range(0, total, len(pattern)):
        n = min(len(pattern), total - pos)
        yield layout.bat_offset + pos, pattern if n == len(pattern) else pattern[:n]


def _present_bat_slices(layout: VhdxLayout, step: int):
    ratio = _bat.chunk_ratio(layout.block_size, layout.logical_sector_size)
    for first in range(0, layout.bat_entries, step):
        # block n sits at data_offset + n * block_size (qemu rounds each
        # to 1 MiB, a no-op since both terms are MiB multiples); sector
        # bitmap entries stay NOT_PRESENT
        values = _bat.entry_run(first, min(first + step, layout.bat_entries), ratio,
                                PAYLOAD_BLOCK_FULLY_PRESENT, layout.data_offset, 0,
                                layout.block_size)
        yield layout.bat_offset + first * 8, values.tobytes()


def create_vhdx(file, size: int, *, subformat: str | None = "dynamic", block_size: int = 0,
                log_size: int | None = DEFAULT_LOG_SIZE, block_state_zero: bool | None = True,
                logical_sector_size: int | None = 512, physical_sector_size: int | None = None,
                creator: str = DEFAULT_CREATOR, parent_locator=None) -> VhdxLayout:
    """Write a new VHDX image to ``file`` (``pwrite``, ``truncate``, ``flush``).

    Raises InvalidArgumentError (qemu's messages) before writing anything.
    Relies on ``truncate`` producing zeros, as POSIX files and memory do.
    """
    layout = plan_vhdx(size, subformat=subformat, block_size=block_size, log_size=log_size,
                       block_state_zero=block_state_zero,
                       logical_sector_size=logical_sector_size,
                       physical_sector_size=physical_sector_size,
                       differencing=parent_locator is not None)
    ident = FileIdentifier(creator).pack()
    region = RegionTable([RegionEntry(BAT_GUID, layout.bat_offset, layout.bat_length),
                          RegionEntry(METADATA_GUID, layout.metadata_offset,
                                      layout.metadata_length)]).pack()
    table, items = build_metadata(DiskParameters(
        block_size=layout.block_size, virtual_size=layout.virtual_size,
        logical_sector_size=layout.logical_sector_size,
        physical_sector_size=layout.physical_sector_size, page83=new_guid(),
        leave_blocks_allocated=layout.fixed, has_parent=parent_locator is not None,
        parent_locator=parent_locator))
    # qemu: a random 32-bit sequence number, header 2 one higher; both share
    # fresh file/data write GUIDs; no log GUID.
    header = Header(sequence_number=int.from_bytes(os.urandom(4), "little"),
                    file_write_guid=new_guid(), data_write_guid=new_guid(), log_length=layout.log_size,
                    log_offset=layout.log_offset)

    file.truncate(0)
    file.pwrite(FILE_ID_OFFSET, ident)
    file.pwrite(HEADER1_OFFSET, header.pack())
    header.sequence_number += 1
    file.pwrite(HEADER2_OFFSET, header.pack())
    file.truncate(layout.file_length)
    for offset, data in _bat_slices(layout):
        file.pwrite(offset, data)
    for offset in REGION_TABLE_OFFSETS:
        file.pwrite(offset, region)
    file.pwrite(layout.metadata_offset, table)
    file.pwrite(layout.metadata_offset + METADATA_TABLE_SIZE, items)
    file.flush()
    return layout
