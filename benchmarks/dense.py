"""Dense converts and served reads: the rows of ``python -m benchmarks.run
--only dense,nbd``, and their profiles (``--profile DIR``).

Dense images: per 4 MiB, 1 MiB random data, 1 MiB explicit zeros, 1 MiB
random data, 1 MiB hole (50% data, 25% zeros, 25% holes), 512 MiB, and
4 GiB with ``--full``.  Each row converts raw->vhdx, vhdx->raw and
vhdx->vhdx with both tools in their default settings (qemu-img runs 8
requests at once, blockdrv 1) and once more with ``-m 8`` on blockdrv.

Profiles: every blockdrv command of these rows once more under pyinstrument
(a text tree per row), and the ``blockdrv nbd`` server under py-spy (a
flame graph and a top-down text dump) while qemu-img converts from it --
the ``bench`` extra pins both tools.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

MiB, GiB = 1 << 20, 1 << 30


def make_dense(path: str, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        zeros = bytes(MiB)
        for base in range(0, size, 4 * MiB):
            os.pwrite(fd, os.urandom(MiB), base)
            os.pwrite(fd, zeros, base + MiB)
            os.pwrite(fd, os.urandom(MiB), base + 2 * MiB)
    finally:
        os.close(fd)


def dense_workloads(work: str, full: bool, Workload, bd: list[str], qemu_img: str,
                    sh, rm) -> list:
    """The dense convert rows (``Workload`` and the helpers are run.py's)."""
    rows = []
    sizes = [512 * MiB] + ([4 * GiB] if full else [])
    for size in sizes:
        tag = f"{size // MiB}M" if size < GiB else f"{size // GiB}G"
        src, vsrc = os.path.join(work, f"dense{tag}.raw"), os.path.join(work, f"dense{tag}.vhdx")
        if not os.path.exists(src):
            print(f"  making {src} ...", file=sys.stderr)
            make_dense(src, size)
        if not os.path.exists(vsrc):
            sh(qemu_img, "convert", "-f", "raw", "-O", "vhdx", src, vsrc)
        for sfmt, dfmt, s in (("raw", "vhdx", src), ("vhdx", "raw", vsrc),
                              ("vhdx", "vhdx", vsrc)):
            o1 = os.path.join(work, f"dout_bd.{dfmt}")
            o2 = os.path.join(work, f"dout_q.{dfmt}")
            for extra in ([], ["-m", "8"]):
                label = f"convert dense {sfmt}->{dfmt} {tag}" + (" (blockdrv -m 8)" if extra
                                                                 else "")
                rows.append(Workload(label,
                                     [*bd, "convert", *extra, "-f", sfmt, "-O", dfmt, s, o1],
                                     [qemu_img, "convert", "-f", sfmt, "-O", dfmt, s, o2],
                                     1.0, prep=rm(o1, o2)))
    return rows


# --------------------------------------------------------------------------- profiles

def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def profile_commands(workloads, outdir: str) -> list[str]:
    """Each blockdrv command once under pyinstrument; returns the reports."""
    written = []
    for w in workloads:
        if not w.bd:
            continue
        if w.prep:
            w.prep()
        cmd = list(w.bd)
        # run the module under pyinstrument with the same arguments
        args = cmd[cmd.index("convert"):] if "convert" in cmd else cmd[1:]
        out = os.path.join(outdir, _slug(w.name) + ".txt")
        subprocess.run([sys.executable, "-m", "pyinstrument", "-i", "0.0005", "-o", out,
                        "-m", "blockdrv", *args], check=True, stdout=subprocess.DEVNULL)
        written.append(out)
    return written


def profile_nbd_server(image: str, fmt: str, outdir: str, label: str) -> list[str]:
    """``blockdrv nbd -r`` under py-spy while qemu-img converts from it."""
    from . import nbd
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    sock = os.path.join(outdir, "prof.sock")
    target = os.path.join(outdir, "prof-out.raw")
    written = []
    for fmt_out, ext in (("speedscope", "json"), ("raw", "folded")):
        out = os.path.join(outdir, f"nbd_{_slug(label)}.{ext}")
        srv = subprocess.Popen([pyspy, "record", "-r", "1000", "-f", fmt_out, "-o", out,
                                "--", *nbd.BD, "nbd", "-r", "-f", fmt, "-k", sock, image],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(sock):
                if srv.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("py-spy: the server did not start")
                time.sleep(0.02)
            nbd.convert(sock, target)
            srv.wait(60)            # the server leaves with its last client
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait()
            if os.path.exists(target):
                os.unlink(target)
        written.append(out)
    return written


def top_frames(folded: str, count: int = 15) -> str:
    """The functions with the most samples (self time) in a py-spy raw dump."""
    self_time: dict[str, int] = {}
    total = 0
    with open(folded) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack:
                continue
            total += int(n)
            leaf = stack.split(";")[-1]
            self_time[leaf] = self_time.get(leaf, 0) + int(n)
    top = sorted(self_time.items(), key=lambda kv: -kv[1])[:count]
    return "\n".join(f"{n * 100 / max(total, 1):5.1f}%  {name}" for name, n in top)
