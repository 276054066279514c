"""Backing chains, owned by the generic layer (QEMU's ``bdrv_open_backing_file``).

A format driver only *names* its parent while it opens: ``bs.backing_file``
(as the image records it; ``info``'s ``backing-filename``),
``bs.backing_format`` (``None``: probe), and, when the image records several
places to look, ``bs.backing_candidates``.  The core then opens the parent --
read-only, through :func:`blockdrv.block.open_node` so a parent may have a
parent of its own -- with the checks every format needs:

* the user may name the parent instead (open option ``backing``, which may
  carry a protocol prefix, and ``backing_fmt``); ``O_NO_BACKING`` opens none;
* relative names are taken against the child's directory (QEMU's
  ``path_combine``); candidates are tried in order, the first that exists wins;
* a chain that loops back to one of its own images, or is deeper than
  :data:`MAX_CHAIN_DEPTH`, is refused instead of recursing;
* the parent inherits ``force-share`` (and the cache flags) as QEMU's backing
  options do;
* the driver may veto the parent it gets (``bdrv_check_backing``: VHDX checks
  its linkage GUID and sector size), and the parent is closed again.

A driver that must see its parent before it writes anything (VHDX replays a
log at open) calls :func:`open_backing` itself at that point; otherwise the
core calls it right after ``bdrv_open``.  Reads of the parent go through
:meth:`blockdrv.node.BlockDriverState.co_read_backing`.
"""

from __future__ import annotations

import errno
import os
from blockdrv._startup import NamedTuple

from .common import O_FORCE_SHARE, O_NO_BACKING, O_NO_FLUSH, O_NOCACHE
from .errors import BlockDriverError, InvalidArgumentError

# Private open option: real paths of the images above this one in the chain.
CHAIN_OPTION = "x-backing-chain"
MAX_CHAIN_DEPTH = 64

# What a parent inherits of its child's open flags (QEMU's bdrv_backing_options:
# force-share and the cache mode; it is always read-only).
_INHERITED = O_FORCE_SHARE | O_NO_FLUSH | O_NOCACHE


class BackingCandidate(NamedTuple):
    """One place to look for the parent."""

    name: str             # as the image records it
    path: str             # what to open
    plain: bool = True    # a plain file path: never read as ``proto:rest``


def default_candidates(bs) -> list[BackingCandidate]:
    """The recorded name, relative to the child's directory.  As in QEMU, a
    name recorded in the image may carry a protocol prefix."""
    from .block import path_combine
    if not bs.backing_file:
        return []
    return [BackingCandidate(bs.backing_file, path_combine(bs.filename, bs.backing_file),
                             plain=False)]


def _local(candidate: BackingCandidate) -> str | None:
    """The host path to look for, or None for a protocol that has no file."""
    from .block import split_protocol
    if candidate.plain:
        return candidate.path
    proto, rest = split_protocol(candidate.path)
    return rest if proto == "file" else None


def _real(path: str | None) -> str | None:
    if path is None:
        return None
    from .block import split_protocol
    proto, rest = split_protocol(path)
    return os.path.realpath(rest) if proto == "file" else path


def _tries(bs) -> list[BackingCandidate] | None:
    """Where to look for the parent, in order; None: the image has none."""
    override = bs.options.get("backing")
    if override is not None and not isinstance(override, str):
        raise InvalidArgumentError("Option 'backing' must be a file name")
    if override:
        return [BackingCandidate(override, override, plain=False)]
    if bs.backing_candidates is not None:
        return list(bs.backing_candidates)      # named, maybe with no usable path
    if bs.backing_file:
        return default_candidates(bs)
    return None


def _chain_of(bs) -> list[str]:
    """The real paths of the images above the parent, this one included."""
    chain = list(bs.options.get(CHAIN_OPTION, ()))
    own = _real(bs.filename)
    if own is not None:
        chain.append(own)
    if len(chain) >= MAX_CHAIN_DEPTH:
        err = InvalidArgumentError(f"Could not open backing file of '{bs.filename}': the "
                                   f"backing chain is deeper than {MAX_CHAIN_DEPTH} images")
        err.in_backing_chain = True
        raise err
    return chain


def _choose(tries: list[BackingCandidate]) -> BackingCandidate:
    """The first candidate that exists (a protocol's is taken as it is)."""
    tried = []
    for cand in tries:
        local = _local(cand)
        if local is None or os.path.exists(local):
            return cand
        tried.append(cand.path)
    # Never open the child alone: its unallocated ranges would read as
    # zeros instead of the parent's data.
    where = ", ".join(f"'{p}'" for p in tried) or "no usable path recorded"
    raise InvalidArgumentError(f"Could not open backing file: parent not found "
                               f"(tried {where})", errno=errno.ENOENT)


def open_backing(bs) -> None:
    """Open ``bs``'s parent (idempotent; nothing to do without one)."""
    if bs.backing is not None or bs.open_flags & O_NO_BACKING:
        return
    tries = _tries(bs)
    if tries is None:
        return
    chain = _chain_of(bs)
    chosen = _choose(tries)
    local = _local(chosen)
    if (os.path.realpath(local) if local is not None else chosen.path) in chain:
        raise InvalidArgumentError(f"Could not open backing file '{chosen.path}': the "
                                   "backing chain loops back to an image already in it")
    fmt = bs.options.get("backing_fmt") or bs.backing_format
    opts = {CHAIN_OPTION: tuple(chain)}
    if chosen.plain:
        opts["file"] = {"driver": "file"}       # whatever the path's text looks like
    from .block import open_node
    try:
        parent = open_node(chosen.path, fmt, bs.open_flags & _INHERITED, opts)
    except BlockDriverError as exc:
        if getattr(exc, "in_backing_chain", False):
            raise                   # already names the image deeper down that failed
        err = type(exc)(f"Could not open backing file '{chosen.path}': {exc.message}",
                        errno=exc.errno)
        err.in_backing_chain = True
        raise err from None
    try:
        veto = bs.drv.bdrv_check_backing
        if veto is not None:
            veto(bs, parent)
    except BaseException:
        parent.close()
        raise
    bs.backing = parent
    bs.backing_file = chosen.name
    bs.full_backing_file = chosen.path
