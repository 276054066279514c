"""Differencing VHDX: the parent locator (spec 2.6.2.6) and the parent chain.

A child names its parent with a VHDX parent locator: ``parent_linkage`` (the
parent's DataWriteGuid when the child was made, ``{lowercase-guid}``),
optionally ``parent_linkage2``, and one or more paths.  Paths are tried in the
spec's order -- ``relative_path`` (against the child's directory), then
``volume_path``, then ``absolute_win32_path``, each mapped best-effort to a
POSIX path -- unless the caller names the parent explicitly (open option
``backing``, the CLI's ``-b``).

The parent is opened read-only through the generic :func:`blockdrv.block.open_node`,
so a parent may itself be differencing.  The chain of real paths being opened
travels down in a private open option, so a cycle (``a -> b -> a``) or an
absurdly deep chain is refused instead of recursing forever.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

from blockdrv.errors import BlockDriverError, CorruptImageError, InvalidArgumentError
from blockdrv.common import O_FORCE_SHARE

from .constants import PARENT_LOCATOR_VHDX_GUID, guid_str, guid_to_bytes
from .metadata import ParentLocator

# Private open option: real paths of the images above this one in the chain.
CHAIN_OPTION = "x-vhdx-chain"
MAX_CHAIN_DEPTH = 64

KEY_LINKAGE = "parent_linkage"
KEY_LINKAGE2 = "parent_linkage2"
KEY_RELATIVE = "relative_path"
KEY_VOLUME = "volume_path"
KEY_ABSOLUTE = "absolute_win32_path"

_DRIVE = re.compile(r"^([A-Za-z]):(.*)$")
_VOLUME = re.compile(r"^Volume\{[0-9A-Fa-f-]+\}(.*)$")


@dataclass
class ParentRef:
    """Where the parent of an open child came from (for ``info``)."""
    backing_filename: str          # as named by the locator / the caller
    full_backing_filename: str     # the path actually opened
    linkage: str                   # parent_linkage as stored


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


def _real(path: str) -> str:
    from blockdrv.block import split_protocol
    proto, rest = split_protocol(path)
    return os.path.realpath(rest) if proto == "file" else path


def open_parent(child: str | None, locator: ParentLocator, options: dict,
                own_real: str | None = None, flags: int = 0):
    """Open the parent read-only: (BlockDriverState, ParentRef).

    ``options``: the child's open options; ``backing`` overrides the locator
    (a path, relative paths taken against the current directory as any
    filename the caller gives), ``backing_fmt`` its format (default: probe,
    must be vhdx).  Raises InvalidArgumentError when no candidate exists or
    the parent's DataWriteGuid does not match the linkage.
    """
    from blockdrv.block import open_node

    chain = list(options.get(CHAIN_OPTION, ()))
    if own_real is not None:
        chain.append(own_real)
    if len(chain) >= MAX_CHAIN_DEPTH:
        raise InvalidArgumentError(f"VHDX backing chain is deeper than {MAX_CHAIN_DEPTH} "
                                   "images")
    override = options.get("backing")
    fmt = options.get("backing_fmt") or options.get("backing.driver")
    if override is not None and not isinstance(override, str):
        raise InvalidArgumentError("Option 'backing' must be a file name")
    # (name as recorded, path to open, plain file path to look for).  Locator
    # paths are plain file paths; only the caller's own ``backing`` may name
    # a protocol (blkdebug::x), which is then not looked for as a file.
    if override:
        from blockdrv.block import split_protocol
        proto, rest = split_protocol(override)
        tries = [(override, override, rest if proto == "file" else None)]
    else:
        tries = [(name, path, path) for name, path in candidates(child, locator)]
    tried = []
    chosen = None
    for name, path, local in tries:
        if local is None or os.path.exists(local):
            chosen = (name, path, local)
            break
        tried.append(path)
    if chosen is None:
        where = ", ".join(f"'{p}'" for p in tried) or "no path in the parent locator"
        raise InvalidArgumentError(f"Could not open backing file: VHDX parent not found "
                                   f"(tried {where})", errno=errno.ENOENT)
    name, path, local = chosen
    real = os.path.realpath(local) if local is not None else path
    if real in chain:
        raise InvalidArgumentError(f"Could not open backing file '{path}': the VHDX backing "
                                   "chain loops back to an image already in it")
    if fmt not in (None, "vhdx"):
        raise InvalidArgumentError(f"VHDX differencing images need a vhdx parent, not {fmt}")
    try:
        opts = {CHAIN_OPTION: tuple(chain)}
        if not override:
            opts["file"] = {"driver": "file"}       # whatever the path's text
        # Read-only; force-share=on is inherited as QEMU's backing options do.
        parent = open_node(path, "vhdx", flags & O_FORCE_SHARE, opts)
    except BlockDriverError as exc:
        raise type(exc)(f"Could not open backing file '{path}': {exc.message}",
                        errno=exc.errno) from None
    try:
        check_linkage(parent, locator, path)
    except BaseException:
        parent.close()
        raise
    return parent, ParentRef(name, path, locator.entries.get(KEY_LINKAGE, ""))


def check_linkage(parent, locator: ParentLocator, path: str) -> None:
    """The parent's current DataWriteGuid must be one of the linkage GUIDs
    (spec 2.6.2.6.3); otherwise it was modified after the child was made."""
    img = parent.opaque
    guid = img.header.data_write_guid
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
