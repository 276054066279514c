"""The header pair of an open image (spec 2.2.2.1): which is current, and
how a session rewrites them.

Headers are updated in place, never through the log: the non-current one is
rewritten with the next sequence number, flushed, and becomes current; both
are rewritten one after the other so both stay valid.  A session renews the
FileWriteGuid when it starts writing and the DataWriteGuid once, before its
first guest-visible change (qemu's vhdx_user_visible_write); a journaled
update sets the LogGuid around its entry (see :mod:`.transaction`).
"""

from __future__ import annotations

from blockdrv._startup import replace
from blockdrv.errors import BlockDriverError

from .checksum import seal
from .constants import HEADER1_OFFSET, HEADER2_OFFSET, HEADER_OFFSETS, HEADER_SIZE, new_guid
from .header import Header, select_current_header


class HeaderState:
    """Both headers, the current index and this session's write GUIDs."""

    def __init__(self, file, headers: list[Header], current: int) -> None:
        self.file = file                  # the protocol node (awaitable I/O)
        self.headers = headers
        self.current_index = current
        self.session_guid = new_guid()
        self.first_visible_write = True
        # Each slot's 4 KiB as last read or written here: only this object
        # writes the headers of an open image, so a journaled update (four
        # header rewrites) need not read them back first.
        self._slots: list[bytes | None] = [None, None]

    @classmethod
    def read(cls, file) -> "HeaderState":
        """Open time (synchronous): select the current header (spec 2.2.2.1)."""
        h1 = file.pread(HEADER1_OFFSET, HEADER_SIZE)
        h2 = file.pread(HEADER2_OFFSET, HEADER_SIZE)
        index, current = select_current_header(h1, h2)
        state = cls(file, [_parse_or(h1, current), _parse_or(h2, current)], index)
        state._slots = [bytes(h1), bytes(h2)]
        return state

    def forget_slots(self) -> None:
        """The header slots were written by someone else: read them again."""
        self._slots = [None, None]

    @property
    def current(self) -> Header:
        return self.headers[self.current_index]

    async def co_update(self, new_data_guid: bool, log_guid: bytes | None) -> None:
        """Write the non-current header as the new current one."""
        idx = 1 - self.current_index
        active, target = self.headers[self.current_index], self.headers[idx]
        target.sequence_number = (active.sequence_number + 1) & ((1 << 64) - 1)
        target.file_write_guid = self.session_guid
        if new_data_guid:
            target.data_write_guid = new_guid()
        if log_guid is not None:
            target.log_guid = log_guid
        offset = HEADER_OFFSETS[idx]
        # Keep whatever the reserved bytes hold: the checksum covers them.
        old = self._slots[idx]
        if old is None:
            old = await self.file.co_pread(offset, HEADER_SIZE)
        buf = bytearray(old)
        buf[:80] = target.pack()[:80]
        seal(buf)
        new = bytes(buf)
        self._slots[idx] = None             # unknown until the write is done
        await self.file.co_pwrite(offset, new)
        self._slots[idx] = new
        await self.file.co_flush()
        self.current_index = idx

    async def co_update_both(self, new_data_guid: bool, log_guid: bytes | None) -> None:
        await self.co_update(new_data_guid, log_guid)
        await self.co_update(new_data_guid, log_guid)

    async def co_set_log_guid(self, guid: bytes) -> None:
        """The journal's callback: name (or clear) the log entry in both headers."""
        await self.co_update_both(False, guid)

    async def co_mark_data_write(self) -> None:
        """Lock held: the session's first guest-visible change rewrites both
        headers with a new DataWriteGuid (once per session)."""
        if self.first_visible_write:
            await self.co_update_both(True, None)
            self.first_visible_write = False


def _parse_or(buf, fallback: Header) -> Header:
    """A header slot as parsed, or a copy of the current one if it is invalid
    (qemu overwrites an invalid slot on the first header update)."""
    try:
        return Header.parse(buf)
    except BlockDriverError:
        return replace(fallback)


__all__ = ["HeaderState"]
