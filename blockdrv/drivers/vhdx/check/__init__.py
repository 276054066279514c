"""``check`` for VHDX: what qemu-img 7.2 finds, the spec violations it misses,
and crash-safe repairs.

Counting (``CheckResult``, qemu's semantics: ``corruptions``/``leaks`` are
what remains after any repair, ``*_fixed`` what was repaired):

* a log replayed by the read-write open counts one fixed corruption (qemu);
  a read-only check of an image with a pending log counts one corruption;
* per BAT entry, qemu's count where qemu finds something -- it counts, for a
  FULLY_PRESENT entry, one for an offset that overflows, one for a start or
  end past the end of file, one for an overlap with the log or a region --
  and otherwise one for each entry with a problem only we detect: payload in
  the header section, overlapping (duplicate) payload blocks,
  PARTIALLY_PRESENT without a parent, an undefined state, reserved bits set,
  a sector bitmap entry in use in an image without a parent;
* the two region table copies must both be valid and agree;
* leaks: 1 MiB units of the file, at or after the first payload offset,
  that nothing references (the header section, log, regions, payload and
  sector bitmap blocks; the space a fixed image preallocates).  The first
  payload offset is the lowest payload block or, at the latest, 4 MiB after
  the last region -- where qemu and blockdrv put the first block.

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
* ``FIX_LEAKS``: unreferenced space at the end of the file is truncated
  (nothing is moved; leaks between used blocks stay counted).

:mod:`.entries` holds the BAT entries as arrays, :mod:`.analysis` finds and
counts corruptions, :mod:`.leaks` the unreferenced space, :mod:`.repair` fixes.
"""

from __future__ import annotations

from blockdrv.errors import BlockDriverError
from blockdrv.node import FIX_ERRORS, FIX_LEAKS, CheckResult

from ..image import VHDXImage
from .analysis import _analyse
from .leaks import _leaks
from .repair import _repair


def check_image(bs, img: VHDXImage, fix: int) -> CheckResult:
    result = CheckResult()
    if img.log_replayed_on_open:
        # qemu counts a log replayed by a read-write open as a fixed corruption.
        result.corruptions_fixed += 1
        result.messages.append("VHDX log replayed on open")
    if img.overlay is not None:
        result.corruptions += 1
        result.messages.append("VHDX log needs to be replayed (open read-write or use -r all)")
    for message in getattr(img, "region_overlaps", ()):
        result.corruptions += 1
        result.messages.append(message)
    if img.differencing:
        # sector bitmap entries (spec 2.5.1.2); counted, not repaired
        from ..bitmap import bitmap_problems
        for message in bitmap_problems(img):
            result.corruptions += 1
            result.messages.append(message)
    writable = not img.read_only and img.overlay is None
    try:
        found = _analyse(img)
        if fix & FIX_ERRORS and writable and found.corruptions:
            _repair(img, found)
            after = _analyse(img)
            result.corruptions_fixed += max(found.corruptions - after.corruptions, 0)
            remaining = set(after.messages)
            result.messages += [f"Repaired: {m}" for m in found.messages if m not in remaining]
            found = after
        result.corruptions += found.corruptions
        result.messages += found.messages
        leaks = _leaks(img)
        if fix & FIX_LEAKS and writable and leaks.trailing:
            img.file.truncate(leaks.keep_length)
            img.file.flush()
            after = _leaks(img)
            result.leaks_fixed += max(leaks.units - after.units, 0)
            result.messages.append(f"Reclaimed {leaks.units - after.units} MiB of unreferenced "
                                   "space at the end of the file")
            leaks = after
        result.leaks += leaks.units
        if leaks.units:
            result.messages.append(f"{leaks.units} MiB of the file are referenced by no BAT entry"
                                   f" ({leaks.trailing} MiB at the end of the file)")
    except BlockDriverError as exc:
        result.check_errors += 1
        result.messages.append(f"Check failed: {exc}")
    return result
