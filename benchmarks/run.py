"""blockdrv vs qemu-img: every workload of issue 5 on both tools, A/B alternated.

    python -m benchmarks.run                  # 512 MiB converts, 5 repetitions
    python -m benchmarks.run --full           # also the 4 GiB converts
    python -m benchmarks.run --reps 7 --only convert,bench --markdown out.md

Each repetition runs every workload once on blockdrv and once on qemu-img (the
order flips every repetition, ABBA, so neither tool always gets the warmer
page cache); the table shows medians and the blockdrv/qemu ratio.  Times are
wall-clock seconds of the whole command (start-up included) except the
``bench`` rows, which use the "Run completed in" figure both tools print (the
request loop only).  Peak RSS comes from wait4() of each child.  Flushes are
counted in one extra, untimed run under ``strace -f -c``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from .compact import compact_workloads
from .dense import (dense_workloads, make_dense, profile_commands, profile_nbd_server,
                    top_frames)
from .install import reexec_installed

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
QEMU_IMG = shutil.which("qemu-img") or "/usr/bin/qemu-img"
QEMU_IO = shutil.which("qemu-io") or "/usr/bin/qemu-io"
PY = sys.executable
BD = [PY, "-m", "blockdrv"]
# The console script of this very interpreter: not whatever `blockdrv` is
# first on PATH, which under pyenv is a bash shim that runs `pyenv exec`
# (~60 ms per command, more than blockdrv's own start-up).
_SCRIPT = os.path.join(os.path.dirname(PY), "blockdrv")
if os.access(_SCRIPT, os.X_OK):
    BD = [_SCRIPT]
elif shutil.which("blockdrv"):
    BD = [shutil.which("blockdrv")]


def byte_compile() -> None:
    """Write the package's .pyc files first: with PYTHONDONTWRITEBYTECODE set
    (as in CI images), a module edited since its .pyc was written would be
    compiled again by every timed command."""
    import compileall
    import blockdrv
    compileall.compile_dir(os.path.dirname(blockdrv.__file__), quiet=1)


# --------------------------------------------------------------------------- running

@dataclass
class Sample:
    wall: float
    rss_kib: int
    metric: float          # what the row reports (wall, or the bench loop time)
    cpu: float = 0.0       # the child's user + system seconds (less noisy on a busy host)


def run_rusage(cmd: list[str], metric: str = "wall") -> Sample:
    """Like :func:`run` but with the child's own peak RSS (wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()}")
    value = wall
    if metric == "bench":
        m = re.search(rb"Run completed in ([0-9.]+) seconds", out)
        value = float(m.group(1)) if m else wall
    return Sample(wall, usage.ru_maxrss, value, usage.ru_utime + usage.ru_stime)


def count_flushes(cmd: list[str]) -> int | None:
    if not shutil.which("strace"):
        return None
    res = subprocess.run(["strace", "-f", "-c", "-e", "trace=fdatasync,fsync", *cmd],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    total = 0
    for line in res.stderr.splitlines():
        parts = line.split()
        if parts and parts[-1] in ("fdatasync", "fsync"):
            total += int(parts[3] if len(parts) >= 6 else parts[-2])
    return total


# --------------------------------------------------------------------------- workloads

@dataclass
class Workload:
    name: str
    bd: list[str]
    qemu: list[str]
    target: float | None          # max ratio blockdrv/qemu
    metric: str = "wall"
    prep: Callable[[], None] | None = None
    note: str = ""
    count: int = 0                # requests, for per-I/O figures
    runner: Callable[[str], float] | None = None    # custom timing ("bd"/"qemu" -> s)
    samples: dict = field(default_factory=lambda: {"bd": [], "qemu": []})
    extra: dict = field(default_factory=dict)


def _rm(*paths: str) -> Callable[[], None]:
    def prep() -> None:
        for p in paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    return prep


def _copy(src: str, dst: str) -> Callable[[], None]:
    def prep() -> None:
        shutil.copyfile(src, dst)
    return prep


def make_raw_with_holes(path: str, size: int) -> None:
    """Per 8 MiB: 2 MiB data, 1 MiB explicit zeros, 1 MiB data at +4 MiB+4 KiB
    (unaligned to blocks), the rest a hole."""
    seed = os.urandom(2 * MiB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        zeros = bytes(MiB)
        for base in range(0, size, 8 * MiB):
            os.pwrite(fd, seed, base)
            os.pwrite(fd, zeros, base + 2 * MiB)
            os.pwrite(fd, seed[:MiB], base + 4 * MiB + 4096)
    finally:
        os.close(fd)


def qemu_io_writes(img: str, offsets: list[int], length: int, fmt: str = "vhdx") -> None:
    """Pattern writes through qemu-io, in batches of 256 commands."""
    for i in range(0, len(offsets), 256):
        args = [QEMU_IO, "-f", fmt]
        for k, off in enumerate(offsets[i:i + 256]):
            args += ["-c", f"write -P {(i + k) % 250 + 1} {off} {length}"]
        sh(*args, img)


def _nbd_runner(image: str, fmt: str, work: str) -> Callable[[str], float]:
    from . import nbd

    def run(who: str) -> float:
        sock = os.path.join(work, f"{who}.sock")
        out = os.path.join(work, f"nbd_{who}.raw")
        with open(os.path.join(work, f"{who}.log"), "wb") as log:
            proc = nbd.start("bd" if who == "bd" else "qemu", image, fmt, sock, log)
            try:
                return nbd.convert(sock, out)
            finally:
                nbd.stop(proc)
                os.unlink(out)
    return run


def _has_format(name: str) -> bool:
    res = subprocess.run([*BD, "create", "-f", name, "-o", "help"],
                         capture_output=True, text=True)
    return res.returncode == 0


def sh(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, stdout=subprocess.DEVNULL)


def build(work: str, args) -> list[Workload]:
    j = lambda name: os.path.join(work, name)          # noqa: E731
    wl: list[Workload] = []
    sel = set(args.only.split(",")) if args.only else None

    def want(group: str) -> bool:
        return sel is None or group in sel

    wl.append(Workload("python -c pass (start-up)", [PY, "-c", "pass"], [PY, "-c", "pass"],
                       None, note="baseline for create"))

    if want("convert"):
        sizes = [512 * MiB] + ([4 * GiB] if args.full else [])
        for size in sizes:
            tag = f"{size // MiB}M" if size < GiB else f"{size // GiB}G"
            src = j(f"src{tag}.raw")
            vsrc = j(f"src{tag}.vhdx")
            if not os.path.exists(src):
                print(f"  making {src} ...", file=sys.stderr)
                make_raw_with_holes(src, size)
            if not os.path.exists(vsrc):
                sh(QEMU_IMG, "convert", "-f", "raw", "-O", "vhdx", src, vsrc)
            target = 1.25 if size < GiB else 1.0
            o1, o2 = j(f"out{tag}_bd.vhdx"), j(f"out{tag}_q.vhdx")
            wl.append(Workload(f"convert raw->vhdx {tag}",
                               [*BD, "convert", "-f", "raw", "-O", "vhdx", src, o1],
                               [QEMU_IMG, "convert", "-f", "raw", "-O", "vhdx", src, o2],
                               target, prep=_rm(o1, o2)))
            r1, r2 = j(f"out{tag}_bd.raw"), j(f"out{tag}_q.raw")
            wl.append(Workload(f"convert vhdx->raw {tag}",
                               [*BD, "convert", "-f", "vhdx", "-O", "raw", vsrc, r1],
                               [QEMU_IMG, "convert", "-f", "vhdx", "-O", "raw", vsrc, r2],
                               target, prep=_rm(r1, r2)))

    if want("data"):
        # issue 12: images with data.  20 GiB, 200 allocated 1 MiB blocks
        # (block 0 among them); 10 GiB, 60% of its (default-size) blocks.
        a20 = j("a20g_200.vhdx")
        if not os.path.exists(a20):
            sh(QEMU_IMG, "create", "-q", "-f", "vhdx", "-o", "block_size=1M", a20, "20G")
            qemu_io_writes(a20, [i * 97 * MiB for i in range(200)], MiB)
        t10 = j("t10g_60.vhdx")
        if not os.path.exists(t10):
            print("  making the 10 GiB image, 60% allocated ...", file=sys.stderr)
            sh(QEMU_IMG, "create", "-q", "-f", "vhdx", t10, "10G")
            bs = 32 * MiB
            qemu_io_writes(t10, [b * bs for b in range(10 * GiB // bs) if b % 5 < 3], bs)
        for tag, img in (("20G 200x1M", a20), ("10G 60%", t10)):
            for cmd in (["info"], ["check"], ["map", "--output=json"]):
                wl.append(Workload(f"{' '.join(cmd)} {tag}", [*BD, *cmd, img],
                                   [QEMU_IMG, *cmd, img], 4.0))
        wl.append(Workload("io read 4k 20G 200x1M",
                           [*BD, "io", "-f", "vhdx", "-r", "-c", "read 0 4k", a20],
                           [QEMU_IO, "-f", "vhdx", "-r", "-c", "read 0 4k", a20], 4.0))

    if want("dense"):
        wl.extend(dense_workloads(work, args.full, Workload, BD, QEMU_IMG, sh, _rm))

    if want("compact"):
        wl.extend(compact_workloads(work, args.full, Workload, BD, QEMU_IMG, QEMU_IO))

    if want("qcow2"):
        q = j("dense512M.qcow2")
        src = j("dense512M.raw")
        if not os.path.exists(src):
            make_dense(src, 512 * MiB)
        if not os.path.exists(q):
            sh(QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", src, q)
        if _has_format("qcow2"):
            o1, o2 = j("qout_bd.raw"), j("qout_q.raw")
            wl.append(Workload("convert dense qcow2->raw 512M",
                               [*BD, "convert", "-f", "qcow2", "-O", "raw", q, o1],
                               [QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", q, o2],
                               1.0, prep=_rm(o1, o2)))
            # issue 10: the migration itself, VHDX -> qcow2 (4 GiB with --full)
            for size in [512 * MiB] + ([4 * GiB] if args.full else []):
                tag = f"{size // MiB}M" if size < GiB else f"{size // GiB}G"
                raw, vsrc = j(f"dense{tag}.raw"), j(f"dense{tag}.vhdx")
                if not os.path.exists(raw):
                    make_dense(raw, size)
                if not os.path.exists(vsrc):
                    sh(QEMU_IMG, "convert", "-f", "raw", "-O", "vhdx", raw, vsrc)
                o1, o2 = j(f"q{tag}_bd.qcow2"), j(f"q{tag}_q.qcow2")
                wl.append(Workload(f"convert dense vhdx->qcow2 {tag}",
                                   [*BD, "convert", "-f", "vhdx", "-O", "qcow2", vsrc, o1],
                                   [QEMU_IMG, "convert", "-f", "vhdx", "-O", "qcow2", vsrc, o2],
                                   1.0, prep=_rm(o1, o2)))
        else:
            print("  no qcow2 driver in this tree: qcow2 rows skipped", file=sys.stderr)

    if want("nbd"):
        from . import nbd
        nimg = nbd.make_images(work, 256 * MiB) if not os.path.exists(j("data.vhdx")) \
            else {"raw": (j("data.raw"), "raw"), "vhdx (dynamic)": (j("data.vhdx"), "vhdx")}
        for label, (image, fmt) in nimg.items():
            run = _nbd_runner(image, fmt, work)
            w = Workload(f"served: qemu-img convert from nbd, {label} 256M",
                         [], [], 1.2, runner=run,
                         note="blockdrv nbd vs qemu-nbd, -r -t, unix socket")
            w.extra["served"] = (image, fmt)
            wl.append(w)

    if want("bench"):
        img = j("bench1G.vhdx")
        if not os.path.exists(img):
            sh(QEMU_IMG, "create", "-f", "vhdx", "-o", "block_size=1M", img, "1G")
            sh(QEMU_IO, "-c", "write -P 0x5a 0 1G", img)
        # 4 KiB requests, a stride of 1 MiB + 4 KiB * 13: every request lands in
        # another block, wrapping round the image (qemu-img bench's -S).
        stride = str(MiB + 13 * 4096)
        n = args.requests
        for write in (False, True):
            for depth in (1, 32):
                flags = ["-w"] if write else []
                common = ["-c", str(n), "-d", str(depth), "-s", "4k", "-S", stride,
                          "-t", "writeback", "-f", "vhdx", *flags, img]
                wl.append(Workload(f"bench 4K {'write' if write else 'read'} qd{depth}",
                                   [*BD, "bench", *common], [QEMU_IMG, "bench", *common],
                                   1.0, metric="bench", count=n))

    if want("alloc"):
        tmpl = j("alloc_tmpl.vhdx")
        sh(QEMU_IMG, "create", "-f", "vhdx", "-o", "block_size=1M", tmpl, "1G")
        nalloc = args.allocs
        script: list[str] = []
        for i in range(nalloc):
            script += ["-c", f"write -P {i % 250 + 1} {i * 3 * MiB + 8192} 4k"]
        a1, a2 = j("alloc_bd.vhdx"), j("alloc_q.vhdx")
        w = Workload(f"allocating writes x{nalloc} (io)", [*BD, "io", "-f", "vhdx", *script, a1],
                     [QEMU_IO, "-f", "vhdx", *script, a2], 1.0,
                     prep=lambda: (_copy(tmpl, a1)(), _copy(tmpl, a2)()), count=nalloc)
        w.extra["flush_cmds"] = (w.bd, w.qemu)
        wl.append(w)
        # The same session without the allocations: open, one read, close.  The
        # difference isolates the journal path from interpreter start-up.
        base = ["-c", "read 0 4k"]
        wl.append(Workload("allocating writes: baseline, no allocation (io)",
                           [*BD, "io", "-f", "vhdx", *base, a1],
                           [QEMU_IO, "-f", "vhdx", *base, a2], None,
                           prep=lambda: (_copy(tmpl, a1)(), _copy(tmpl, a2)()),
                           note="no target: start-up baseline for the next row"))

    if want("info"):
        big = j("big64T_1M.vhdx")
        if not os.path.exists(big):
            print("  making the 64 TiB / 1 MiB-block image (512 MiB BAT) ...", file=sys.stderr)
            sh(QEMU_IMG, "create", "-f", "vhdx", "-o", "block_size=1M", big, "64T")
        w = Workload("info 64 TiB, 1 MiB blocks", [*BD, "info", big], [QEMU_IMG, "info", big],
                     2.0, note="BAT 513 MiB")
        w.extra["bat_bytes"] = 8 * ((64 * TiB // MiB) + (64 * TiB // MiB - 1) // 4096)
        wl.append(w)
        b40 = j("big40T.vhdx")
        if not os.path.exists(b40):
            sh(QEMU_IMG, "create", "-f", "vhdx", b40, "40T")
        wl.append(Workload("info 40 TiB, default blocks", [*BD, "info", b40],
                           [QEMU_IMG, "info", b40], 2.0))

    if want("create"):
        c1, c2 = j("cr_bd.vhdx"), j("cr_q.vhdx")
        wl.append(Workload("create fixed 4 GiB",
                           [*BD, "create", "-q", "-f", "vhdx", "-o", "subformat=fixed", c1, "4G"],
                           [QEMU_IMG, "create", "-q", "-f", "vhdx", "-o", "subformat=fixed",
                            c2, "4G"], None, prep=_rm(c1, c2), note="start-up"))
        wl.append(Workload("create dynamic 64 TiB",
                           [*BD, "create", "-q", "-f", "vhdx", c1, "64T"],
                           [QEMU_IMG, "create", "-q", "-f", "vhdx", c2, "64T"], None,
                           prep=_rm(c1, c2), note="start-up"))
        wl.append(Workload("create dynamic 64 TiB, 1 MiB blocks",
                           [*BD, "create", "-q", "-f", "vhdx", "-o", "block_size=1M", c1, "64T"],
                           [QEMU_IMG, "create", "-q", "-f", "vhdx", "-o", "block_size=1M",
                            c2, "64T"], None, prep=_rm(c1, c2),
                           note="no target: writes the 513 MiB ZERO-state BAT, as qemu does"))
    return wl


# --------------------------------------------------------------------------- baseline

def preadv_baseline(img: str, n: int, stride: int, write: bool) -> float:
    """Seconds for the same requests as bare os.preadv/pwritev on the host file
    (the VHDX payload sits 1:1 after the metadata; offsets differ, cost not)."""
    fd = os.open(img, os.O_RDWR if write else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size - 64 * MiB
        buf = [bytearray(4096)]
        off = 0
        op = os.pwritev if write else os.preadv
        t0 = time.perf_counter()
        for _ in range(n):
            op(fd, buf, 16 * MiB + off)
            off = (off + stride) % size
        return time.perf_counter() - t0
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- report

def fmt_t(v: float) -> str:
    return f"{v * 1000:.1f} ms" if v < 10 else f"{v:.2f} s"


def report(wl: list[Workload], args, machine: str) -> str:
    start = next(w for w in wl if w.name.startswith("python -c pass"))
    py0 = statistics.median(s.metric for s in start.samples["bd"])
    lines = [f"Machine: {machine}, {time.strftime('%Y-%m-%d')}. {args.reps} alternating "
             f"repetitions (ABBA), medians; `python -c pass`: {fmt_t(py0)}.",
             "",
             "| workload | blockdrv | qemu | ratio | target | met | notes |",
             "| --- | ---: | ---: | ---: | --- | --- | --- |"]
    for w in wl:
        if w is start:
            continue
        bd = statistics.median(s.metric for s in w.samples["bd"])
        q = statistics.median(s.metric for s in w.samples["qemu"])
        ratio = bd / q if q else float("inf")
        notes = []
        target, met = "", ""
        if w.note.startswith("no target"):
            notes.append(w.note)
        elif w.runner is not None:
            target = f"<= {w.target:g}x"
            met = "yes" if ratio <= w.target else "no"
            notes.append(w.note)
        elif w.name.startswith("create"):
            beyond = bd - py0
            target = "<= 100 ms beyond start-up"
            met = "yes" if beyond <= 0.100 else "no"
            notes.append(f"beyond `python -c pass` ({fmt_t(py0)}): {beyond * 1000:.0f} ms")
        elif w.target is not None:
            target = f"<= {w.target:g}x"
            met = "yes" if ratio <= w.target else "no"
        if w.metric == "wall":
            sb = sorted(x.metric for x in w.samples["bd"])
            sq = sorted(x.metric for x in w.samples["qemu"])
            notes.append(f"spread {fmt_t(sb[0])}-{fmt_t(sb[-1])} vs {fmt_t(sq[0])}-{fmt_t(sq[-1])}")
            if w.name.startswith("convert dense"):
                cb = statistics.median(x.cpu for x in w.samples["bd"])
                cq = statistics.median(x.cpu for x in w.samples["qemu"])
                notes.append(f"CPU {fmt_t(cb)} vs {fmt_t(cq)} ({cb / cq:.2f}x)")
        if w.count and w.metric == "bench":
            us_bd, us_q = bd / w.count * 1e6, q / w.count * 1e6
            notes.append(f"{us_bd:.1f} vs {us_q:.1f} us/IO")
            if "bare" in w.extra:
                notes.append(f"Python overhead {us_bd - w.extra['bare'] / w.count * 1e6:.1f}"
                             " us/IO over bare os.preadv/pwritev")
        if w.name.startswith("info 64") or w.name.startswith("info 40"):
            rss_bd = statistics.median(s.rss_kib for s in w.samples["bd"]) / 1024
            rss_q = statistics.median(s.rss_kib for s in w.samples["qemu"]) / 1024
            notes.append(f"peak RSS {rss_bd:.0f} vs {rss_q:.0f} MiB")
            if "bat_bytes" in w.extra:
                lim = w.extra["bat_bytes"] / MiB
                notes.append(f"{rss_bd / lim:.2f}x the BAT ({lim:.0f} MiB), target <= 1.2x")
        if "flushes" in w.extra:
            fb, fq = w.extra["flushes"]
            if fb is not None:
                notes.append(f"flushes/alloc {fb / w.count:.1f} vs {fq / w.count:.1f}")
        lines.append(f"| {w.name} | {fmt_t(bd)} | {fmt_t(q)} | {ratio:.2f} | {target} | "
                     f"{met} | {'; '.join(notes)} |")
        if w.name.startswith("allocating writes: baseline"):
            lines.append(_per_allocation_row(wl, w))
    return "\n".join(lines)


def _per_allocation_row(wl: list[Workload], base: Workload) -> str:
    """Median whole-script time minus the no-allocation baseline, per
    allocation: the journal path with start-up taken out of both tools."""
    alloc = next(w for w in wl if w.name.startswith("allocating writes x"))

    def per(side: str) -> float:
        full = statistics.median(s.metric for s in alloc.samples[side])
        zero = statistics.median(s.metric for s in base.samples[side])
        return (full - zero) / alloc.count

    bd, q = per("bd"), per("qemu")
    ratio = bd / q if q > 0 else float("inf")
    met = "yes" if ratio <= 1.0 else "no"
    return (f"| allocating writes, per allocation (x{alloc.count} minus baseline) | "
            f"{bd * 1e6:.0f} us | {q * 1e6:.0f} us | {ratio:.2f} | <= 1x | {met} | "
            "journal path only: start-up subtracted on both sides |")


def profile(wl: list[Workload], outdir: str) -> None:
    """One profiled run of each dense convert and served row."""
    os.makedirs(outdir, exist_ok=True)
    dense = [w for w in wl if w.name.startswith("convert dense")]
    for path in profile_commands(dense, outdir):
        print(f"  profile: {path}", file=sys.stderr)
    for w in wl:
        if "served" in w.extra:
            image, fmt = w.extra["served"]
            for path in profile_nbd_server(image, fmt, outdir, w.name):
                print(f"  profile: {path}", file=sys.stderr)
                if path.endswith(".folded"):
                    print(f"{w.name}: self time\n{top_frames(path)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in-place", action="store_true",
                    help="time the blockdrv of this interpreter (default: an ordinary, "
                         "non-editable install of this checkout in a venv of its own)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--full", action="store_true", help="add the 4 GiB converts")
    p.add_argument("--only", help="comma list of groups: convert,dense,data,qcow2,nbd,bench,"
                                  "alloc,info,create,compact")
    p.add_argument("--requests", type=int, default=50000, help="requests per bench row")
    p.add_argument("--allocs", type=int, default=64, help="allocating writes per run")
    p.add_argument("--workdir", help="keep images here (default: a temp dir, removed)")
    p.add_argument("--markdown", default=os.path.join(os.path.dirname(__file__), "results.md"))
    p.add_argument("--machine", default=f"{os.cpu_count()} cores, shared/noisy")
    p.add_argument("--profile", metavar="DIR",
                   help="after the timed runs, profile the dense and served rows into DIR: "
                        "pyinstrument per blockdrv command, py-spy on the nbd server "
                        "(pip install -e '.[bench]')")
    args = p.parse_args(argv)
    reexec_installed("benchmarks.run", sys.argv[1:] if argv is None else argv)
    work = args.workdir or tempfile.mkdtemp(prefix="blockdrv-bench-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    byte_compile()
    try:
        wl = build(work, args)
        for w in wl:
            if "flush_cmds" in w.extra:
                w.prep()
                fb = count_flushes(w.extra["flush_cmds"][0])
                fq = count_flushes(w.extra["flush_cmds"][1])
                w.extra["flushes"] = (fb, fq)
        for w in wl:
            if w.metric == "bench" and w.count:
                stride = MiB + 13 * 4096
                img = [a for a in w.bd if a.endswith(".vhdx")][-1]
                w.extra["bare"] = statistics.median(
                    preadv_baseline(img, w.count, stride, "-w" in w.bd) for _ in range(3))
        for rep in range(args.reps):
            print(f"repetition {rep + 1}/{args.reps}", file=sys.stderr)
            for w in wl:
                order = ("bd", "qemu") if rep % 2 == 0 else ("qemu", "bd")
                for who in order:
                    if w.prep:
                        w.prep()
                    if w.runner is not None:
                        t = w.runner(who)
                        w.samples[who].append(Sample(t, 0, t))
                        continue
                    w.samples[who].append(run_rusage(w.bd if who == "bd" else w.qemu,
                                                     w.metric))
        if args.profile:
            profile(wl, args.profile)
        table = report(wl, args, args.machine)
        print(table)
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
        print(f"\n(written to {args.markdown})", file=sys.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
