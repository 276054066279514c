"""Compaction: the rows of ``python -m benchmarks.run --only compact``.

The image is what a WSL 2 distro leaves behind after ``dd if=/dev/zero
of=/zero; rm /zero``: a dynamic VHDX with 1 MiB blocks (WSL's block size),
4 GiB (and 10 GiB with ``--full``), made by qemu-img and qemu-io.  In runs
of 4 MiB placed by a seeded shuffle, 30% of the blocks hold random data,
30% hold zeros written as data (FULLY_PRESENT blocks of zeros), 40% were
never written.

qemu has no compact command; what a qemu user does instead is copy the
image with ``qemu-img convert -O vhdx`` (which skips zeros), so that is the
figure beside ``blockdrv compact``.  The copy keeps the source's block size
(``-o block_size=1M``): with qemu's default (16 MiB for these sizes) a
block holding any data would be allocated whole and the sizes would not
compare.

Compaction changes the image in place, so every timed run gets a fresh copy
of a pristine image first (untimed, flushed so its dirty pages are not
written back during the timing).  Once per image, before any timing, the
compacted copy is checked against qemu: ``qemu-img compare`` with the
pristine image must say identical and ``qemu-img check`` must be clean --
a row never reports a broken result.  The file sizes of both results go in
the row's notes.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys

MiB, GiB = 1 << 20, 1 << 30
_BLOCK = MiB
_RUN = 4 * MiB                   # the unit of the layout's shuffle
_MAX_WRITE = 64 * MiB            # one qemu-io request at most (its buffer)
_SOURCES = 8                     # random pattern files, cycled over the data runs


def _layout(size: int, seed: int = 60) -> list[tuple[int, int, str]]:
    """(offset, length, kind) of the written extents, kind "data" or
    "zero"; adjacent runs of one kind are merged up to _MAX_WRITE."""
    n = size // _RUN
    kinds = ["data"] * (n * 3 // 10) + ["zero"] * (n * 3 // 10)
    kinds += [None] * (n - len(kinds))
    random.Random(seed).shuffle(kinds)
    out: list[tuple[int, int, str]] = []
    for i, kind in enumerate(kinds):
        if kind is None:
            continue
        off = i * _RUN
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == off \
                and out[-1][1] + _RUN <= _MAX_WRITE:
            o, ln, _ = out.pop()
            out.append((o, ln + _RUN, kind))
        else:
            out.append((off, _RUN, kind))
    return out


def make_wsl_like(path: str, size: int, qemu_img: str, qemu_io: str) -> None:
    work = os.path.dirname(path)
    # qemu-io's -s repeats a file to fill the request; a period of 1 MiB + 512
    # bytes makes the blocks of one run differ from each other.
    sources = []
    for k in range(_SOURCES):
        src = os.path.join(work, f"wsl_pattern{k}.bin")
        with open(src, "wb") as f:
            f.write(os.urandom(_BLOCK + 512))
        sources.append(src)
    tmp = path + ".part"
    try:
        subprocess.run([qemu_img, "create", "-q", "-f", "vhdx", "-o",
                        f"block_size={_BLOCK}", tmp, str(size)], check=True)
        cmds = []
        for i, (off, length, kind) in enumerate(_layout(size)):
            fill = ["-s", sources[i % _SOURCES]] if kind == "data" else ["-P", "0"]
            cmds += ["-c", " ".join(["write", "-q", *fill, str(off), str(length)])]
        for i in range(0, len(cmds), 2 * 256):
            subprocess.run([qemu_io, "-f", "vhdx", *cmds[i:i + 2 * 256], tmp], check=True,
                           stdout=subprocess.DEVNULL)
        os.replace(tmp, path)
    finally:
        for f in sources + [tmp]:
            if os.path.exists(f):
                os.unlink(f)


_restored: dict[str, tuple] = {}


def _restore(pristine: str, work_copy: str) -> None:
    """A fresh copy of the pristine image (reflinked where the filesystem
    can), flushed; skipped when the copy is untouched since the last one."""
    try:
        st = os.stat(work_copy)
        if _restored.get(work_copy) == (st.st_ino, st.st_size, st.st_mtime_ns):
            return
    except FileNotFoundError:
        pass
    subprocess.run(["cp", "--reflink=auto", pristine, work_copy], check=True)
    fd = os.open(work_copy, os.O_RDONLY)
    try:
        os.fsync(fd)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    _restored[work_copy] = (st.st_ino, st.st_size, st.st_mtime_ns)


def _sizes(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_blocks * 512


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _verify(bd: list[str], qemu_img: str, pristine: str, work_copy: str,
            q_out: str) -> str:
    """One untimed compaction and one qemu copy: the compacted image must
    equal the pristine one and check clean.  Returns the sizes note."""
    _restore(pristine, work_copy)
    done = subprocess.run([*bd, "compact", work_copy], check=True, capture_output=True,
                          text=True).stdout
    detail = re.search(r"\(([^()]*)\)\.\s*$", done)
    res = subprocess.run([qemu_img, "compare", "-f", "vhdx", "-F", "vhdx", pristine,
                          work_copy], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"compacted {work_copy} differs from {pristine}: "
                           f"{(res.stdout + res.stderr).strip()}")
    res = subprocess.run([qemu_img, "check", "-f", "vhdx", work_copy],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"qemu-img check of compacted {work_copy}: "
                           f"{(res.stdout + res.stderr).strip()}")
    if os.path.exists(q_out):
        os.unlink(q_out)
    subprocess.run([qemu_img, "convert", "-f", "vhdx", "-O", "vhdx", "-o",
                    f"block_size={_BLOCK}", pristine, q_out], check=True)
    before, after, copy = _sizes(pristine), _sizes(work_copy), _sizes(q_out)
    if after[0] >= before[0]:
        raise RuntimeError(f"compact freed nothing in {work_copy}: {done.strip()}")
    return (f"file (apparent/du) {_gib(before[0])}/{_gib(before[1])} -> compact "
            f"{_gib(after[0])}/{_gib(after[1])}, convert {_gib(copy[0])}/{_gib(copy[1])}; "
            f"{detail.group(1) if detail else 'compacted'}; compare identical, check clean")


def compact_workloads(work: str, full: bool, Workload, bd: list[str], qemu_img: str,
                      qemu_io: str) -> list:
    """The compact rows (``Workload`` is run.py's)."""
    rows = []
    for size in [4 * GiB] + ([10 * GiB] if full else []):
        tag = f"{size // GiB}G"
        pristine = os.path.join(work, f"wsl{tag}.vhdx")
        if not os.path.exists(pristine):
            print(f"  making {pristine} (WSL-like, 60% of blocks written) ...",
                  file=sys.stderr)
            make_wsl_like(pristine, size, qemu_img, qemu_io)
        work_copy = os.path.join(work, f"wsl{tag}_bd.vhdx")
        q_out = os.path.join(work, f"wsl{tag}_q.vhdx")
        sizes = _verify(bd, qemu_img, pristine, work_copy, q_out)

        def prep(pristine=pristine, work_copy=work_copy, q_out=q_out) -> None:
            _restore(pristine, work_copy)
            if os.path.exists(q_out):
                os.unlink(q_out)

        rows.append(Workload(
            f"compact WSL-like {tag} (30% data, 30% zeros)",
            [*bd, "compact", "-q", work_copy],
            [qemu_img, "convert", "-f", "vhdx", "-O", "vhdx", "-o", f"block_size={_BLOCK}",
             pristine, q_out],
            None, prep=prep,
            note=f"no target: qemu has no compact, its figure is `qemu-img convert -O vhdx` "
                 f"(a copy skipping zeros, same 1 MiB blocks); {sizes}"))
    return rows
