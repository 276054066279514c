"""``check`` for VHDX: what qemu-img 7.2 finds, the spec violations it misses,
and crash-safe repairs.

Counting (``CheckResult``, qemu's semantics: ``corruptions``/``leaks`` are
what remains after any repair, ``*_fixed`` what was repaired):

* a log replayed by the read-write open counts one fixed corruption (qemu),
  without a message (qemu prints none);
* a read-only check of an image with a pending log counts nothing: a crash
  leaves one and the next read-write open replays it (spec 2.3.3); a message
  says so, and the rest of the check looks at the image as replayed;
* a header LogGuid that no valid log entry carries counts one corruption
  (spec 2.3.3); ``FIX_ERRORS`` clears it (nothing was journaled under it);
* a LastFileOffset beyond everything the image references (replay grows the
  file only that far, see :meth:`..log.replay.ReplayOverlay.bound`): a message;
* per BAT entry, qemu's count where qemu finds something -- it counts, for a
  FULLY_PRESENT entry, one for an offset that overflows, one for a start or
  end past the end of file, one for an overlap with the log or a region --
  and otherwise one for each entry with a problem only we detect: payload in
  the header section, overlapping (duplicate) payload blocks,
  PARTIALLY_PRESENT without a parent, an undefined state, reserved bits set,
  a sector bitmap entry in use in an image without a parent;
* the two region table copies must both be valid and agree;
* leaks: none, as qemu.  Free space -- bytes at or after the first payload
  offset that nothing references (the header section, log, regions, payload
  and sector bitmap blocks, a fixed image's preallocation) -- is legal
  anywhere (spec 2.1) and reported in a message with its size in bytes.  The
  first payload offset is the lowest payload block or, at the latest, 4 MiB
  after the last region -- where qemu and blockdrv put the first block.

Repairs (need a read-write open; every BAT change goes through the log, one
entry per run of at most 64 BAT sectors, so a power cut during repair
replays or drops whole updates):

* ``FIX_ERRORS``: an entry pointing into the header/log/BAT/metadata, wholly
  past the end of file, or with an undefined state becomes NOT_PRESENT (none
  of these was readable: open refuses them or the read fails); a block cut
  short by truncation gets the file extended to its end (its surviving bytes
  stay); a block overlapping an earlier one gets a copy of the shared data in
  a new block (both guest blocks read what they read before); reserved bits
  are cleared; stray sector bitmap entries are cleared; a bad region table
  copy is rewritten from the good one.  PARTIALLY_PRESENT blocks are left
  alone: which sectors are valid is known only to a parent we do not have.
* ``FIX_LEAKS``: free space at the end of the file is truncated, reported in
  a message and not counted (nothing is moved; free space between used
  blocks stays).

:mod:`..validate` finds what is wrong with the BAT (the rules open refuses
images by, too), :mod:`.analysis` counts it as qemu does and describes it,
:mod:`.leaks` finds the free space, :mod:`.repair` fixes.
"""

from __future__ import annotations

from blockdrv.errors import BlockDriverError
from blockdrv.common import FIX_ERRORS, FIX_LEAKS, CheckResult

from ..aio import blocking
from ..constants import ZERO_GUID
from ..image import VHDXImage
from .analysis import _analyse
from .leaks import _free_space


def check_image(bs, img: VHDXImage, fix: int) -> CheckResult:
    result = CheckResult()
    writable = not img.read_only and img.overlay is None
    _check_log(img, fix, writable, result)
    for message in getattr(img, "region_overlaps", ()):
        result.corruptions += 1
        result.messages.append(message)
    if img.differencing:
        # sector bitmap entries (spec 2.5.1.2); counted, not repaired
        from ..validate import bitmap_problems
        for message in bitmap_problems(img.layout, img.file_length()):
            result.corruptions += 1
            result.messages.append(message)
    try:
        found = _analyse(img)
        if fix & FIX_ERRORS and writable and found.corruptions:
            from .repair import _repair     # array (collections) for repairs only
            _repair(img, found)
            after = _analyse(img)
            result.corruptions_fixed += max(found.corruptions - after.corruptions, 0)
            remaining = set(after.messages)
            result.messages += [f"Repaired: {m}" for m in found.messages if m not in remaining]
            found = after
        result.corruptions += found.corruptions
        result.messages += found.messages
        # Free space is allowed anywhere (spec 2.1) and qemu-img never calls
        # it a leak: reported, never counted.
        free = _free_space(img, found.found)        # the file as analysed
        if fix & FIX_LEAKS and writable and free.trailing:
            img.file.truncate(free.keep_length)
            img.file.flush()
            result.messages.append(f"Reclaimed {free.trailing} bytes of free space at the "
                                   "end of the file")
            free = _free_space(img)
        if free.total:
            where = (f"`check -r leaks` reclaims the {free.trailing} bytes at the end of the file"
                     if free.trailing else "it lies between used blocks, where it stays")
            result.messages.append(f"Image contains {free.total} bytes of free space (not "
                                   f"referenced by the BAT; not a leak); {where}")
    except BlockDriverError as exc:
        result.check_errors += 1
        result.messages.append(f"Check failed: {exc}")
    return result


def _check_log(img: VHDXImage, fix: int, writable: bool, result: CheckResult) -> None:
    """What open found about the log: replayed, pending, capped, orphaned GUID."""
    if img.log_replayed_on_open:
        # qemu counts a log replayed by a read-write open as a fixed
        # corruption -- and prints nothing about it (nor do we).
        result.corruptions_fixed += 1
    if img.overlay is not None:
        # A pending log is what a crash leaves, not a corruption: the next
        # read-write open replays it (spec 2.3.3); the rest of the check
        # looks at the image as replayed.
        result.messages.append(
            "The image has a pending log that will be replayed on the next read-write open "
            "(`check -r all` replays it now)")
    if img.last_file_offset_cap is not None:
        last, length = img.last_file_offset_cap
        done = "was extended" if img.overlay is None else "will be extended"
        result.messages.append(
            f"VHDX log entry LastFileOffset {last} lies beyond everything the image "
            f"references; the file {done} only to {length} bytes")
        img.last_file_offset_cap = None         # said once, not again by a double check
    if img.log_guid_without_entries is not None:
        what = ("VHDX header names a log (GUID "
                f"{img.log_guid_without_entries.hex()}) but no valid log entry carries it")
        if fix & FIX_ERRORS and writable:
            # nothing was journaled under that GUID, so nothing needs replaying
            blocking(img.headers.co_update_both(False, ZERO_GUID))
            img.log_guid_without_entries = None
            result.corruptions_fixed += 1
            result.messages.append(f"Repaired: {what}; the log GUID was cleared")
        else:
            result.corruptions += 1
            result.messages.append(f"{what}; `check -r all` clears it")
