"""Opening and creating images: protocol selection, probing, the node chain.

``open_node("disk.vhdx")`` builds ``vhdx --file--> file``; ``fmt`` skips the
probe.  Filenames may name a protocol as ``proto:rest`` (``memory:scratch``)
or be a URI whose scheme a protocol claims (``nbd+unix:///?socket=s``,
``https://host/disk.vhdx``); anything else is a POSIX path.
"""

from __future__ import annotations

import os
from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any, Iterable, Iterator

from .errors import BlockDriverError, InvalidArgumentError
from .common import O_FORCE_SHARE, O_PROTOCOL, O_RDWR, O_UNMAP
from .node import BlockDriverState
from .options import CreateOption, parse_create_options
from .plugins import BoundDriver, get_registry
from .backing import open_backing
from .probe import PROBE_BUF_SIZE, probe, unsupported


_SCHEME_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_SCHEME_REST = _SCHEME_FIRST | frozenset("0123456789+.-")


def uri_scheme(filename: str) -> str | None:
    """The scheme of ``scheme://...`` (RFC 3986's ``ALPHA *( ALPHA / DIGIT /
    "+" / "-" / "." )``), else None.  By hand: ``re`` (with enum) would cost
    every short command ~7 ms of imports."""
    end = filename.find("://")
    if end <= 0 or filename[0] not in _SCHEME_FIRST:
        return None
    scheme = filename[:end]
    return scheme if all(c in _SCHEME_REST for c in scheme) else None


def uri_schemes() -> dict[str, str]:
    """URI scheme -> protocol name: a protocol driver claims ``scheme://...``
    filenames by listing the schemes in its ``uri_schemes`` attribute."""
    found: dict[str, str] = {}
    for name, drv in get_registry().protocols.items():
        for scheme in getattr(drv.plugin, "uri_schemes", None) or ():
            found.setdefault(scheme.lower(), name)
    return found


def split_protocol(filename: str) -> tuple[str, str]:
    """``("memory", "x")`` for ``memory:x``; for a URI whose scheme a protocol
    claims, ``(protocol, uri)``; ``("file", path)`` otherwise."""
    scheme = uri_scheme(filename)
    if scheme:
        proto = uri_schemes().get(scheme.lower())
        if proto is not None:
            return proto, filename
    reg = get_registry()
    head, sep, rest = filename.partition(":")
    if sep and head in reg.protocols and "/" not in head:
        return head, rest
    return "file", filename


def path_combine(base: str | None, name: str) -> str:
    """QEMU's path_combine: ``name`` relative to the directory of the image
    ``base`` (how backing file names are resolved); absolute names unchanged."""
    if os.path.isabs(name) or not base:
        return name
    proto, rest = split_protocol(base)
    if proto != "file":
        rest = rest.rsplit(":", 1)[-1]
    d = os.path.dirname(rest)
    return os.path.join(d, name) if d else name


def _force_share_flags(filename: str, flags: int, options: dict[str, Any]) -> int:
    share = options.pop("force_share", None)
    if share is None:
        share = options.pop("force-share", None)
    if isinstance(share, str):
        share = share.lower() in ("on", "true", "yes", "1")
    if share:
        flags |= O_FORCE_SHARE
    if flags & O_FORCE_SHARE and flags & O_RDWR:
        raise InvalidArgumentError("force-share=on can only be used with read-only images",
                                   filename=filename)
    return flags


DISCARD_MODES = {"off": False, "ignore": False, "on": True, "unmap": True}


def parse_discard_flags(mode: str, flags: int) -> int:
    """QEMU's bdrv_parse_discard_flags: ``discard=unmap``/``on`` pass guest
    discards down (``O_UNMAP``), ``ignore``/``off`` drop them."""
    unmap = DISCARD_MODES.get(mode)
    if unmap is None:
        raise InvalidArgumentError(f"Invalid discard option: {mode}")
    return flags | O_UNMAP if unmap else flags & ~O_UNMAP


def _discard_flags(filename: str, flags: int, options: dict[str, Any]) -> int:
    mode = options.get("discard")
    if mode is None:
        return flags
    try:
        return parse_discard_flags(str(mode), flags)
    except InvalidArgumentError as exc:
        raise exc.with_filename(filename)


def open_protocol(filename: str, flags: int = 0, options: dict[str, Any] | None = None,
                  protocol: str | None = None) -> BlockDriverState:
    reg = get_registry()
    if protocol is None and options and options.get("driver"):
        # QEMU's file.driver=...: a filter such as blkdebug over a plain path
        protocol = str(options["driver"])
    if protocol is None:
        protocol, _ = split_protocol(filename)
    drv = reg.protocol(protocol)
    bs = BlockDriverState(drv, filename, flags | O_PROTOCOL, options)
    try:
        drv.bdrv_open(bs, bs.options, bs.open_flags)
    except BlockDriverError as exc:
        raise exc.with_filename(filename)
    return bs


def _take_perm(bs: BlockDriverState, target: BlockDriverState, flags: int) -> None:
    """Lock what ``bs`` (opened with ``flags``) needs of ``target``, the node
    below it or the protocol node itself, before anything reads metadata or
    writes: a conflict with another user fails the open."""
    from .perm import child_perm
    perm, shared = child_perm(bs.drv, bs, flags)
    target.update_perm(perm, shared)


def open_node(filename: str, fmt: str | None = None, flags: int = 0,
              options: dict[str, Any] | None = None) -> BlockDriverState:
    """Open ``filename`` as a format node over a protocol node.

    ``options["force_share"]`` (or the flag ``O_FORCE_SHARE``) is QEMU's
    ``force-share=on``: take no lock that would keep a writer out.
    ``options["discard"]`` (ignore/off/unmap/on) sets or clears ``O_UNMAP``
    and stays in the node's options for its driver.
    """
    reg = get_registry()
    options = dict(options or {})
    flags = _force_share_flags(filename, flags, options)
    flags = _discard_flags(filename, flags, options)
    if fmt is not None:
        drv = reg.format(fmt)
        if drv.protocol_name and not drv.format_name:
            bs = open_protocol(filename, flags, options, protocol=fmt)
            try:
                _take_perm(bs, bs, flags)
            except BaseException:
                bs.close()
                raise
            return bs
    file_bs = open_protocol(filename, flags, options.pop("file", None))
    bs = None
    opened = False
    try:
        probed_raw = False
        if fmt is None:
            buf = file_bs.pread(0, min(PROBE_BUF_SIZE, file_bs.total_size))
            drv, name, _ = probe(reg, bytes(buf), filename)
            if drv is None and name is not None:
                # qemu-img would open it with its own driver; opening it as
                # raw here would expose (and let writes destroy) its metadata.
                raise unsupported(name, file_bs)
            if drv is None:
                raise InvalidArgumentError("Could not determine the image format",
                                           filename=filename)
            probed_raw = drv.format_name == "raw"
        file_bs.growable = True
        bs = BlockDriverState(drv, filename, flags, options)
        bs.file = file_bs
        bs.probed_raw = probed_raw
        _take_perm(bs, file_bs, flags)
        drv.bdrv_open(bs, options, flags)
        opened = True
        open_backing(bs)            # unless the driver did already (or names none)
    except BaseException as exc:
        if bs is not None and bs.backing is not None:
            bs.backing.close()
        if opened and drv.bdrv_close is not None:
            drv.bdrv_close(bs)      # opened, then its parent failed: release it
        file_bs.close()
        if isinstance(exc, BlockDriverError):
            raise exc.with_filename(filename)
        raise
    return bs


def create_opts(fmt: str) -> list[CreateOption]:
    drv = get_registry().format(fmt)
    if drv.bdrv_create is None:
        raise InvalidArgumentError(f"Format driver '{fmt}' does not support image creation")
    return drv.create_opts()


def create(filename: str, fmt: str, options: dict[str, Any]) -> None:
    """Create an image; on failure remove the file if this call created it.

    ``options`` are raw ``-o`` values (strings) or already typed values; they
    are checked against the driver's create options first.
    """
    drv: BoundDriver = get_registry().format(fmt)
    if drv.bdrv_create is None:
        raise InvalidArgumentError(f"Format driver '{fmt}' does not support image creation")
    parsed = parse_create_options(options, drv.create_opts())
    protocol, path = split_protocol(filename)
    existed = protocol != "file" or os.path.lexists(path)
    try:
        drv.bdrv_create(filename, parsed)
    except BaseException as exc:
        if not existed:
            try:
                os.unlink(path)
            except OSError:
                pass
        if isinstance(exc, BlockDriverError):
            raise exc.with_filename(filename)
        raise


def create_file(filename: str, size: int = 0) -> BlockDriverState:
    """For drivers' ``bdrv_create``: a fresh, empty, writable protocol node
    (truncated to ``size``)."""
    bs = open_protocol(filename, O_RDWR, {"create": True})
    try:
        bs.truncate(size)
    except BaseException:
        bs.close()
        raise
    bs.growable = True
    return bs


# -- "never write over a source" ---------------------------------------------------


def _name_identities(filename: str) -> set[tuple]:
    """What host object a filename names: ``("file", st_dev, st_ino)`` for a
    path that exists (through symlinks; hard links share the inode), and
    ``(protocol, rest)`` for other protocols (``memory:x``); a filter's
    ``proto:CONFIG:CHILD`` also names what ``CHILD`` names."""
    proto, rest = split_protocol(filename)
    if proto != "file":
        _, sep, child = rest.partition(":")
        return {(proto, rest)} | (_name_identities(child) if sep and child else set())
    try:
        st = os.stat(rest)
    except (OSError, ValueError):
        return set()
    return {("file", st.st_dev, st.st_ino)}


def _node_files(bs: BlockDriverState, role: str) -> Iterator[tuple[set[tuple], str]]:
    """(identities, description) of every node under ``bs``: itself, its file
    child and its backing chain.  An open file node is taken by its
    descriptor, so a path renamed since the open still counts."""
    ids = _name_identities(bs.filename) if bs.filename else set()
    fd = getattr(bs.opaque, "fd", None) if bs.file is None else None
    if isinstance(fd, int) and fd >= 0:
        try:
            st = os.fstat(fd)
            ids.add(("file", st.st_dev, st.st_ino))
        except OSError:
            pass
    yield ids, role
    if bs.file is not None:
        yield from _node_files(bs.file, role)
    if bs.backing is not None:
        yield from _node_files(bs.backing,
                               f"backing file '{bs.backing.filename}' of {role}")


def check_target_not_source(target: str,
                            sources: Iterable[BlockDriverState | str]) -> None:
    """Refuse to write ``target`` when it is a file some source reads from.

    ``sources`` are open nodes (their whole chain counts: file children and
    backing files) or filenames.  Sameness is by device and inode, so another
    spelling, a symlink or a hard link of a source is caught; a target that
    does not exist yet is never a source.  Call it before creating or
    truncating anything.  This does not rely on image locking (qemu-img gets
    "Failed to get "write" lock" there); commands that write one image while
    reading others (convert, commit, rebase) call it explicitly.
    """
    wanted = _name_identities(target)
    if not wanted:
        return
    for src in sources:
        if isinstance(src, str):
            found = [(_name_identities(src), f"source '{src}'")]
        else:
            found = _node_files(src, f"source '{src.filename}'")
        for ids, what in found:
            if ids & wanted:
                raise InvalidArgumentError(
                    f"Target '{target}' is the same file as {what}; "
                    "refusing to overwrite an input image")
