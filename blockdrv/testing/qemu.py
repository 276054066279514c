"""Running the oracle (qemu-img / qemu-io) and replaying qemu-io scripts.

Every runner returns ``(rc, stdout, stderr)`` and never raises on a non-zero
exit; the JSON helpers raise :class:`QemuError` when qemu-img fails.

A *script* is a list of qemu-io command strings (``"write -P 0x41 0 64k"``).
:func:`replay_script` runs one script on either tool; :func:`random_script`
makes seeded ones.  Compare outputs with :attr:`ScriptResult.normalized`
(timings masked by :func:`blockdrv.cli.io.normalize_qemu_io_output`).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence

from .compare import data_extents


QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")
DEFAULT_TIMEOUT = 600


class QemuError(RuntimeError):
    def __init__(self, argv: Sequence[str], rc: int, stderr: str) -> None:
        super().__init__(f"{' '.join(map(str, argv))} exited {rc}: {stderr.strip()}")
        self.argv, self.rc, self.stderr = list(argv), rc, stderr


def _run(argv: Sequence[str], timeout: float | None = DEFAULT_TIMEOUT,
         env: dict | None = None) -> tuple[int, str, str]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr


# -- qemu-img ---------------------------------------------------------------------


def run_qemu_img(*args, timeout: float | None = DEFAULT_TIMEOUT) -> tuple[int, str, str]:
    """``qemu-img ARGS...`` -> (rc, stdout, stderr)."""
    return _run([QEMU_IMG, *args], timeout)


def _img_json(args: list[str]):
    argv = [QEMU_IMG, *args]
    rc, out, err = _run(argv)
    if rc != 0:
        raise QemuError(argv, rc, err)
    return json.loads(out)


def qemu_img_create(path, fmt: str, size: int | str, **options) -> None:
    """``qemu-img create -f FMT [-o k=v,...] PATH SIZE``; raises on failure."""
    argv = [QEMU_IMG, "create", "-q", "-f", fmt]
    if options:
        argv += ["-o", ",".join(f"{k}={_optval(v)}" for k, v in options.items())]
    argv += [os.fspath(path), str(size)]
    rc, out, err = _run(argv)
    if rc != 0:
        raise QemuError(argv, rc, err)


def _optval(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v).replace(",", ",,")


def qemu_img_info(path, fmt: str | None = None) -> dict:
    """``qemu-img info --output=json``."""
    return _img_json(["info", "--output=json", *(["-f", fmt] if fmt else []),
                      os.fspath(path)])


def qemu_img_map(path, fmt: str | None = None) -> list[dict]:
    """``qemu-img map --output=json``."""
    return _img_json(["map", "--output=json", *(["-f", fmt] if fmt else []),
                      os.fspath(path)])


def qemu_img_check(path, fmt: str | None = None, repair: str | None = None
                   ) -> tuple[int, dict | None]:
    """``qemu-img check --output=json [-r leaks|all]`` -> (rc, parsed JSON or
    None).  rc: 0 clean, 1 error, 2 corruptions, 3 leaks (qemu-img's codes)."""
    argv = [QEMU_IMG, "check", "--output=json", *(["-f", fmt] if fmt else []),
            *(["-r", repair] if repair else []), os.fspath(path)]
    rc, out, err = _run(argv)
    try:
        data = json.loads(out) if out.strip() else None
    except json.JSONDecodeError:
        data = None
    return rc, data


# -- qemu-io / blockdrv io ----------------------------------------------------------


def _io_argv(commands: Iterable[str], path, fmt: str | None, readonly: bool,
             extra: Sequence[str] = ()) -> list[str]:
    argv: list[str] = [*extra]
    if fmt:
        argv += ["-f", fmt]
    if readonly:
        argv.append("-r")
    for c in commands:
        argv += ["-c", c]
    argv.append(os.fspath(path))
    return argv


def run_qemu_io(path, commands: Iterable[str], fmt: str | None = None,
                readonly: bool = False, extra: Sequence[str] = (),
                timeout: float | None = DEFAULT_TIMEOUT) -> tuple[int, str, str]:
    """``qemu-io [-f FMT] [-r] -c CMD... PATH`` -> (rc, stdout, stderr)."""
    return _run([QEMU_IO, *_io_argv(commands, path, fmt, readonly, extra)], timeout)


def run_blockdrv_io(path, commands: Iterable[str], fmt: str | None = None,
                    readonly: bool = False, extra: Sequence[str] = (),
                    subprocess_: bool = False,
                    timeout: float | None = DEFAULT_TIMEOUT) -> tuple[int, str, str]:
    """``blockdrv io`` -> (rc, stdout, stderr); in-process unless ``subprocess_``."""
    argv = _io_argv(commands, path, fmt, readonly, extra)
    if subprocess_:
        return _run([sys.executable, "-m", "blockdrv.cli.io", *argv], timeout)
    from ..cli import io as io_cli
    out, err = io.StringIO(), io.StringIO()
    rc = io_cli.run(argv, out, err, stdin=io.StringIO(""))
    return rc, out.getvalue(), err.getvalue()


@dataclass
class ScriptResult:
    """What one tool printed for a script."""

    tool: str
    rc: int
    stdout: str
    stderr: str

    @property
    def normalized(self) -> tuple[int, str, str]:
        """(rc, stdout, stderr) with timings and program names masked."""
        from ..cli.io import normalize_qemu_io_output
        return (self.rc, normalize_qemu_io_output(self.stdout),
                normalize_qemu_io_output(self.stderr))


def replay_script(commands: Sequence[str], path, fmt: str | None = "raw",
                  tool: str = "qemu", readonly: bool = False,
                  subprocess_: bool = False, batch: int = 0) -> ScriptResult:
    """Run a qemu-io script on ``path`` with ``tool`` ("qemu" or "blockdrv").

    ``batch`` > 0 splits the script into several invocations of that many
    commands (each one an open/close cycle of the image); the outputs are
    concatenated and rc is the worst one.
    """
    if tool not in ("qemu", "blockdrv"):
        raise ValueError(f"unknown tool {tool!r}")
    commands = list(commands)
    chunks = [commands[i:i + batch] for i in range(0, len(commands), batch)] \
        if batch > 0 else [commands]
    rc, outs, errs = 0, [], []
    for chunk in chunks or [[]]:
        if tool == "qemu":
            r, o, e = run_qemu_io(path, chunk, fmt, readonly)
        else:
            r, o, e = run_blockdrv_io(path, chunk, fmt, readonly, subprocess_=subprocess_)
        rc = max(rc, r)
        outs.append(o)
        errs.append(e)
    return ScriptResult(tool, rc, "".join(outs), "".join(errs))


# -- seeded random scripts --------------------------------------------------------------


class _Shadow:
    """What the guest should read: painted intervals of (value | None)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.segs: list[list] = [[0, size, 0]] if size else []

    def paint(self, start: int, end: int, value: int | None) -> None:
        end = min(end, self.size)
        if start >= end:
            return
        out = []
        for s, e, v in self.segs:
            if e <= start or s >= end:
                out.append([s, e, v])
                continue
            if s < start:
                out.append([s, start, v])
            if e > end:
                out.append([end, e, v])
        out.append([start, end, value])
        out.sort()
        merged: list[list] = []
        for seg in out:
            if merged and merged[-1][1] == seg[0] and merged[-1][2] == seg[2]:
                merged[-1][1] = seg[1]
            else:
                merged.append(seg)
        self.segs = merged

    def uniform(self, start: int, end: int) -> int | None:
        """The single known byte value of [start, end), or None."""
        vals = {v for s, e, v in self.segs if s < end and e > start}
        if len(vals) == 1:
            (v,) = vals
            return v
        return None


def random_script(seed: int, size: int, n: int = 50, *, max_len: int = 4 << 20,
                  aligned: float = 0.5, out_of_range: float = 0.02,
                  weights: dict[str, float] | None = None,
                  discard_zeroes: bool = False, flush_every: int = 0) -> list[str]:
    """A reproducible qemu-io script of ``n`` commands for a ``size``-byte image.

    Mix (``weights``, defaults below): pattern writes (``write -P``), zero
    writes (``write -z``, some with ``-u``), discards, reads and flushes.
    Offsets are 512-aligned with probability ``aligned``, else any byte; lengths
    go up to ``max_len`` (aligned ones in sectors, others in bytes).  Reads
    verify with ``-P`` whenever the shadow model knows the range is uniform
    (discarded ranges are unknown unless ``discard_zeroes``), so both tools
    check data and not only their output.  ``out_of_range`` is the probability
    of a request crossing the end of the image (which must fail on both).
    ``flush_every`` > 0 adds a flush after that many commands.
    """
    rng = random.Random(seed)
    w = {"write": 5, "zero": 1.5, "discard": 1, "read": 3, "flush": 0.5}
    if weights:
        w.update(weights)
    kinds, probs = zip(*w.items())
    shadow = _Shadow(size)
    script: list[str] = []
    if size <= 0:
        return ["length"]

    def pick_range(op: str) -> tuple[int, int]:
        if rng.random() < out_of_range:
            length = rng.randint(1, max(1, min(max_len, 1 << 16)))
            start = max(0, size - rng.randint(0, length - 1 if length > 1 else 0))
            if start + length <= size:
                start = size - length + 1
            return start, length
        if rng.random() < aligned:
            sectors = max(1, size // 512)
            length = 512 * rng.randint(1, max(1, min(max_len, size) // 512))
            start = 512 * rng.randrange(0, sectors)
            if start + length > size:
                length = max(0, (size - start) // 512 * 512) or min(512, size - start)
        else:
            length = rng.randint(1, max(1, min(max_len, size)))
            start = rng.randrange(0, size)
            if start + length > size:
                length = size - start
        return start, length

    for i in range(n):
        kind = rng.choices(kinds, probs)[0]
        if kind == "flush":
            script.append("flush")
        elif kind == "write":
            start, length = pick_range(kind)
            pattern = rng.randint(1, 255)
            script.append(f"write -P 0x{pattern:02x} {start} {length}")
            if start + length <= size:
                shadow.paint(start, start + length, pattern)
        elif kind == "zero":
            start, length = pick_range(kind)
            unmap = rng.random() < 0.5
            script.append(f"write -z{' -u' if unmap else ''} {start} {length}")
            if start + length <= size:
                shadow.paint(start, start + length, 0)
        elif kind == "discard":
            start, length = pick_range(kind)
            script.append(f"discard {start} {length}")
            if start + length <= size:
                shadow.paint(start, start + length, 0 if discard_zeroes else None)
        else:
            start, length = pick_range(kind)
            value = shadow.uniform(start, start + length) \
                if start + length <= size else None
            if value is not None:
                script.append(f"read -P 0x{value:02x} {start} {length}")
            else:
                script.append(f"read {start} {length}")
        if flush_every and (i + 1) % flush_every == 0:
            script.append("flush")
    return script


# -- files -------------------------------------------------------------------------------


def sparse_copy(src, dst) -> None:
    """Copy a file keeping its holes (SEEK_DATA/SEEK_HOLE), so a 40 TiB sparse
    template copies in milliseconds."""
    src, dst = os.fspath(src), os.fspath(dst)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        for start, end in data_extents(src):
            fi.seek(start)
            fo.seek(start)
            left = end - start
            while left:
                block = fi.read(min(left, 8 << 20))
                if not block:
                    break
                fo.write(block)
                left -= len(block)
        fo.truncate(size)
    shutil.copymode(src, dst)


__all__ = [
    "QemuError", "run_qemu_img", "run_qemu_io", "run_blockdrv_io", "qemu_img_create",
    "qemu_img_info", "qemu_img_map", "qemu_img_check", "ScriptResult",
    "replay_script", "random_script", "sparse_copy",
]
