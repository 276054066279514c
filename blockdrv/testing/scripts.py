"""Format-independent script helpers of the interop harness.

* :func:`verify_reads` -- ``read -P`` commands checking what a qemu-io
  script's writes left behind;
* :func:`run_blockdrv` -- the ``blockdrv`` command in-process, output captured;
* :func:`guest_bytes` -- the whole guest disk through ``blockdrv.open_image``.
"""

from __future__ import annotations

import contextlib
import io
import os

from .qemu import _Shadow

MiB = 1 << 20


def verify_reads(script: list[str], size: int) -> list[str]:
    """``read -P`` commands checking the final content of every range that the
    ``write -P`` / ``write -z`` commands of ``script`` touched."""
    shadow = _Shadow(size)
    touched = _Shadow(size)
    for cmd in script:
        words = cmd.split()
        if not words or words[0] != "write":
            continue
        start, length = int(words[-2]), int(words[-1])
        if start + length > size:
            continue
        value = int(words[2], 0) if words[1] == "-P" else 0
        shadow.paint(start, start + length, value)
        touched.paint(start, start + length, 1)
    reads = []
    for ts, te, t in touched.segs:
        if not t:
            continue
        for s, e, v in shadow.segs:
            lo, hi = max(s, ts), min(e, te)
            if lo < hi:
                reads.append(f"read -P 0x{v:02x} {lo} {hi - lo}")
    return reads


def run_blockdrv(*args) -> tuple[int, str, str]:
    """``blockdrv ARGS...`` in-process -> (rc, stdout, stderr)."""
    from ..cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def guest_bytes(path, fmt: str | None = None, chunk: int = 8 * MiB) -> bytes:
    """The whole guest disk as read through ``blockdrv.open_image``."""
    import blockdrv
    with blockdrv.open_image(path, fmt) as img:
        size = img.size
        parts = []
        for pos in range(0, size, chunk):
            parts.append(bytes(img.read(pos, min(chunk, size - pos))))
    return b"".join(parts)



__all__ = ["verify_reads", "run_blockdrv", "guest_bytes"]
