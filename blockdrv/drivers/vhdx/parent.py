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
    """(name as recorded, POSIX path to try) in the spec's order.

    The paths are plain file paths, never protocol strings, whatever their
    text looks like (``blkdebug::/x`` is a file named so)."""
    e = locator.entries
    out: list[tuple[str, str]] = []
    rel = e.get(KEY_RELATIVE)
    if rel:
        name = rel.replace("\\", "/")
        if name.startswith("./"):
            name = name[2:]
        out.append((name, _plain(path_combine(child, name))))
    for key in (KEY_VOLUME, KEY_ABSOLUTE):
        value = e.get(key)
        if value:
            out += [(p, _plain(p)) for p in _win_to_posix(value)]
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

def win32_absolute(path: str) -> str:
    """absolute_win32_path for a POSIX path: WSL's /mnt/<d>/... becomes
    ``\\\\?\\D:\\...``; anything else keeps its POSIX root as ``\\\\?\\\\tmp\\x``
    (what :func:`_win_to_posix` maps back)."""
    m = re.match(r"^/mnt/([a-zA-Z])(/.*|)$", path)
    if m:
        return "\\\\?\\" + m.group(1).upper() + ":" + (m.group(2) or "/").replace("/", "\\")
    return "\\\\?\\" + path.replace("/", "\\")


def build_locator(child_path: str, parent_path: str, data_write_guid: bytes) -> ParentLocator:
    """The locator a new child stores: linkage, relative and absolute paths."""
    parent_abs = os.path.abspath(parent_path)
    child_dir = os.path.dirname(os.path.abspath(child_path))
    rel = os.path.relpath(parent_abs, child_dir)
    entries = {
        KEY_LINKAGE: "{" + guid_str(data_write_guid) + "}",
        KEY_RELATIVE: rel.replace("/", "\\"),
        KEY_ABSOLUTE: win32_absolute(parent_abs),
    }
    return ParentLocator(PARENT_LOCATOR_VHDX_GUID, entries)
