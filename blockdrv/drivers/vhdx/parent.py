"""Differencing VHDX: the parent locator (spec 2.6.2.6).

A child names its parent with a VHDX parent locator: ``parent_linkage`` (the
parent's DataWriteGuid when the child was made, ``{lowercase-guid}``),
optionally ``parent_linkage2``, and one or more paths.  Paths are tried in the
spec's order -- ``relative_path`` (against the child's directory), then
``volume_path``, then ``absolute_win32_path``, each mapped best-effort to a
POSIX path -- unless the caller names the parent explicitly (open option
``backing``, the CLI's ``-b``).

This module only reads and writes the locator and judges a parent
(:func:`check_parent`); opening the chain -- candidates, loops, depth,
inherited options -- is the core's (:mod:`blockdrv.backing`).
"""

from __future__ import annotations

import os
import re

from blockdrv.errors import CorruptImageError, InvalidArgumentError

from .constants import PARENT_LOCATOR_VHDX_GUID, guid_str, guid_to_bytes
from .metadata import ParentLocator

KEY_LINKAGE = "parent_linkage"
KEY_LINKAGE2 = "parent_linkage2"
KEY_RELATIVE = "relative_path"
KEY_VOLUME = "volume_path"
KEY_ABSOLUTE = "absolute_win32_path"

_DRIVE = re.compile(r"^([A-Za-z]):(.*)$")
_VOLUME = re.compile(r"^Volume\{[0-9A-Fa-f-]+\}(.*)$")


def linkage_guids(locator: ParentLocator) -> list[bytes]:
    """The on-disk GUID bytes of parent_linkage (and parent_linkage2)."""
    out = []
    for key in (KEY_LINKAGE, KEY_LINKAGE2):
        text = locator.entries.get(key)
        if text is None:
            continue
        try:
            out.append(guid_to_bytes(text))
        except ValueError:
            raise CorruptImageError(f"VHDX parent locator has an invalid {key} "
                                    f"'{text}'") from None
    return out


def validate_locator(locator: ParentLocator) -> None:
    """The VHDX locator type, a parseable parent_linkage and at least one path."""
    if locator.locator_type != PARENT_LOCATOR_VHDX_GUID:
        from blockdrv.errors import UnsupportedError
        raise UnsupportedError(f"VHDX parent locator type {guid_str(locator.locator_type)} "
                               "is not supported (only VHDX parents are)")
    if KEY_LINKAGE not in locator.entries:
        raise CorruptImageError("VHDX parent locator has no parent_linkage")
    linkage_guids(locator)
    if not any(k in locator.entries for k in (KEY_RELATIVE, KEY_VOLUME, KEY_ABSOLUTE)):
        raise CorruptImageError("VHDX parent locator has no path to the parent")


from blockdrv.block import path_combine  # noqa: E402  (re-exported)


def _win_to_posix(path: str) -> list[str]:
    """POSIX readings of a Win32 path: ``\\\\?\\d:\\a\\b`` -> /mnt/d/a/b, /a/b;
    ``\\\\?\\Volume{..}\\a\\b`` -> /a/b; blockdrv's ``\\\\?\\\\tmp\\x`` -> /tmp/x."""
    p = path
    for prefix in ("\\\\?\\", "\\??\\"):
        if p.startswith(prefix):
            p = p[len(prefix):]
            break
    out = []
    m = _VOLUME.match(p)
    if m:
        p = m.group(1)
    m = _DRIVE.match(p)
    if m:
        rest = m.group(2).replace("\\", "/").lstrip("/")
        out.append(f"/mnt/{m.group(1).lower()}/{rest}")      # WSL's mounts
        out.append("/" + rest)
    elif p.startswith("UNC\\") or p.startswith("\\\\"):
        return out                                             # a share: nothing to map
    else:
        out.append("/" + p.replace("\\", "/").lstrip("/"))
    return out


def _plain(path: str) -> str:
    """A locator path as a plain file path: a relative one whose first
    component holds a colon gets ``./`` so it never reads as ``proto:rest``."""
    if not os.path.isabs(path) and ":" in path.split("/", 1)[0]:
        return "./" + path
    return path


def candidates(child: str | None, locator: ParentLocator) -> list[tuple[str, str]]:
    """(name as recorded, POSIX path to try) in the spec's order, each path
    once (a relative and an absolute entry often name the same file).

    The paths are plain file paths, never protocol strings, whatever their
    text looks like (``blkdebug::/x`` is a file named so)."""
    e = locator.entries
    out: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(name: str, path: str) -> None:
        key = os.path.normpath(path)
        if key not in seen:
            seen.add(key)
            out.append((name, path))

    rel = e.get(KEY_RELATIVE)
    if rel:
        name = rel.replace("\\", "/")
        if name.startswith("./"):
            name = name[2:]
        add(name, _plain(path_combine(child, name)))
    for key in (KEY_VOLUME, KEY_ABSOLUTE):
        value = e.get(key)
        if value:
            for p in _win_to_posix(value):
                add(p, _plain(p))
    return out


def check_parent(child, parent, path: str) -> None:
    """Refuse a parent that is not this child's: not VHDX, another logical
    sector size (spec 2.6.2.4), or a DataWriteGuid that is none of the linkage
    GUIDs (spec 2.6.2.6.3: it was modified after the child was made)."""
    if parent.format_name != "vhdx":
        raise InvalidArgumentError(f"VHDX differencing images need a vhdx parent, not "
                                   f"{parent.format_name}")
    pimg = parent.opaque
    if pimg.logical_sector_size != child.logical_sector_size:
        raise CorruptImageError(
            f"VHDX parent '{path}' has {pimg.logical_sector_size}-byte logical sectors, "
            f"this image {child.logical_sector_size} (they must be equal)")
    locator = child.params.parent_locator
    guid = pimg.header.data_write_guid
    if guid not in linkage_guids(locator):
        raise CorruptImageError(
            f"VHDX parent '{path}' does not match this image: its DataWriteGuid "
            f"{{{guid_str(guid)}}} is not the parent_linkage "
            f"{locator.entries.get(KEY_LINKAGE)} (the parent was modified after the "
            "differencing image was made)")


# ------------------------------------------------------------------ create

def win32_absolute(path: str) -> str | None:
    """absolute_win32_path for a POSIX path, or None when there is no Win32
    name to give.

    Hyper-V writes ``\\\\?\\D:\\dir\\parent.vhdx`` (spec 2.6.2.6.2 shows the
    form); a POSIX path has a Win32 name only under WSL's drive mounts
    (``/mnt/d/dir/x`` is ``D:\\dir\\x``).  Any other path (``/srv/vm/x``)
    has none Windows could resolve, and the spec requires only
    ``parent_linkage`` plus at least one path entry, so the entry is left
    out and ``relative_path`` alone locates the parent.  Images written
    before with the old ``\\\\?\\\\srv\\vm\\x`` form are still read
    (:func:`_win_to_posix`)."""
    m = re.match(r"^/mnt/([a-zA-Z])(/.*|)$", path)
    if m:
        return "\\\\?\\" + m.group(1).upper() + ":" + (m.group(2) or "/").replace("/", "\\")
    return None


def relative_path(child_path: str, parent_path: str) -> str:
    """relative_path: the parent from the child's directory, backslashes."""
    parent_abs = os.path.abspath(parent_path)
    child_dir = os.path.dirname(os.path.abspath(child_path))
    return os.path.relpath(parent_abs, child_dir).replace("/", "\\")


def build_locator(child_path: str, parent_path: str, data_write_guid: bytes,
                  linkage2: bytes | None = None) -> ParentLocator:
    """The locator a child stores: linkage (and an alternate linkage2),
    relative path, and the absolute Win32 path where there is one."""
    entries = {KEY_LINKAGE: "{" + guid_str(data_write_guid) + "}"}
    if linkage2 is not None and linkage2 != data_write_guid:
        entries[KEY_LINKAGE2] = "{" + guid_str(linkage2) + "}"
    entries[KEY_RELATIVE] = relative_path(child_path, parent_path)
    win = win32_absolute(os.path.abspath(parent_path))
    if win is not None:
        entries[KEY_ABSOLUTE] = win
    return ParentLocator(PARENT_LOCATOR_VHDX_GUID, entries)


# ------------------------------------------------------------------ rewrite

async def co_write_locator(img, locator: ParentLocator) -> None:
    """Replace the parent locator item of an open, writable image as one
    journaled update (spec 2.3): the item's bytes -- in place when it fits
    its old room or is the region's last item, else after the last item --
    and, when its length or place changes, the metadata table.  Held:
    ``img.lock``.  The in-memory locator changes once the entry is durable."""
    from .constants import PARENT_LOCATOR_GUID
    from .metadata import MetadataEntry, MetadataTable
    data = locator.pack()
    region = img.region_table.metadata
    table = img.layout.metadata_table
    entry = next((e for e in table.entries
                  if e.item_id == PARENT_LOCATOR_GUID and not e.is_user), None)
    if entry is None:
        raise CorruptImageError("VHDX differencing image has no parent locator item")
    ends = [e.offset + e.length for e in table.entries if e.length]
    last = entry.offset + entry.length >= max(ends)
    if len(data) <= entry.length or (last and entry.offset + len(data) <= region.length):
        offset = entry.offset
    else:
        offset = -(-max(ends) // 8) * 8
        if offset + len(data) > region.length:
            raise InvalidArgumentError("The new parent locator does not fit the VHDX "
                                       "metadata region")
    new_entries = [MetadataEntry(e.item_id, offset, len(data), e.flags, e.reserved)
                   if e is entry else e for e in table.entries]
    new_table = MetadataTable(new_entries)
    padded = data + bytes(max(0, entry.length - len(data)) if offset == entry.offset else 0)
    async with img.transaction() as tx:
        tx.write(region.file_offset + offset, padded)
        if (offset, len(data)) != (entry.offset, entry.length):
            tx.write(region.file_offset, new_table.pack())

        def publish() -> None:
            img.layout.metadata_table = new_table
            img.params.parent_locator = locator
        tx.on_commit(publish)
