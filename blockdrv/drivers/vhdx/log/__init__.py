"""The VHDX metadata journal (MS-VHDX v6.0, section 2.3): parse, replay, write.

The log is a ring of 4 KiB sectors at ``log_offset``.  An entry is one or more
descriptor sectors (the first starts with a 64-byte header) followed by one
data sector per data descriptor.  Entries may straddle the end of the ring;
every read and write here goes sector by sector modulo ``log_length``.

* :mod:`.entry`    -- 2.3.1: the on-disk structures; build and read one entry
* :mod:`.sequence` -- 2.3.2: scan the ring for the active sequence
* :mod:`.replay`   -- 2.3.3: replay it, in memory or into the file
* :mod:`.writer`   -- journal updates the way qemu-img 7.2 does

Where qemu is laxer than the spec (it never checks data-sector signatures or
the head's tail, and compares sequences by their first entry) we follow the
spec; for every log qemu itself writes, both give the same result.
"""

from __future__ import annotations

# The public names of the submodules, the constants callers use, and the
# private helpers tests use (_crc seals hand-made entries; _Ring, _Budget).
from .. import checksum as _crc  # noqa: F401
from ..constants import ZERO_GUID, MiB  # noqa: F401
from .entry import (DATA_BYTES, MAX_FILE_OFFSET, SECTOR, SIG_DATA, SIG_DESC,  # noqa: F401
                    SIG_ENTRY, SIG_ZERO, DataDescriptor, DataSector, LogEntry, LogEntryHeader,
                    ZeroDescriptor, build_entry, descriptor_sectors, join_sector, read_entry,
                    split_sector)
from .replay import (LogWithoutEntriesError, ReplayOverlay, apply_overlay, co_apply_overlay,
                     co_write_zeros, replay_log, replay_log_in_memory)
from .sequence import _Budget, _Ring, LogSequence, find_active_sequence  # noqa: F401
from .writer import LogWriter, co_merge_sectors, log_entry_mask, merge_sectors

__all__ = [
    "LogEntryHeader", "ZeroDescriptor", "DataDescriptor", "DataSector", "LogEntry",
    "LogSequence", "ReplayOverlay", "LogWithoutEntriesError", "LogWriter", "build_entry",
    "read_entry",
    "find_active_sequence", "replay_log", "replay_log_in_memory", "apply_overlay",
    "merge_sectors", "co_merge_sectors", "co_apply_overlay", "co_write_zeros", "split_sector", "join_sector", "descriptor_sectors",
    "log_entry_mask", "ZERO_GUID", "SECTOR",
]
