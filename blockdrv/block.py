"""Opening and creating images: protocol selection, probing, the node chain.

``open_node("disk.vhdx")`` builds ``vhdx --file--> file``; ``fmt`` skips the
probe.  Filenames may name a protocol as ``proto:rest`` (``memory:scratch``);
anything else is a POSIX path.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import BlockDriverError, InvalidArgumentError
from .node import O_FORCE_SHARE, O_PROTOCOL, O_RDWR, BlockDriverState
from .options import CreateOption, parse_create_options
from .plugins import BoundDriver, get_registry
from .probe import PROBE_BUF_SIZE, probe, unsupported


def split_protocol(filename: str) -> tuple[str, str]:
    """``("memory", "x")`` for ``memory:x``; ``("file", path)`` otherwise."""
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
    """
    reg = get_registry()
    options = dict(options or {})
    flags = _force_share_flags(filename, flags, options)
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
    except BlockDriverError as exc:
        file_bs.close()
        raise exc.with_filename(filename)
    except BaseException:
        file_bs.close()
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
