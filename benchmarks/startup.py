"""Short commands, whole-command wall time: blockdrv beside qemu-img / qemu-io.

    python -m benchmarks.startup                      # 21 alternated runs per row
    python -m benchmarks.startup --reps 41 --markdown out.md
    python -m benchmarks.startup --imports            # what each command imports
    python -m benchmarks.startup --profile "map big"  # pyinstrument tree of one row

Rows: ``info``, ``check``, ``map`` and ``io -c 'read 0 4k'`` of a 20 GiB VHDX
with 200 allocated 1 MiB blocks, a 1 TiB VHDX with 1 MiB blocks (1 M BAT
entries, 200 of them allocated), a raw and a qcow2 image with data.  Each
repetition runs every row once on each tool, the order flipping every
repetition (ABBA); the table shows medians, the ratio and the target (4x
qemu's whole command).  ``python -c pass`` is measured the same way: it is
the floor under every blockdrv figure; so is the floor of any pip console
script with an argparse command line (pip's script imports ``re``).  By
default blockdrv is timed as a user installs it: see :mod:`benchmarks.install`
(``--in-place`` times this interpreter's).  ``--imports`` runs each blockdrv
command under ``-X importtime`` and reports the module count, the slowest
imports and whether numpy was loaded; ``--profile`` needs the ``bench``
extra (pyinstrument).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from .install import reexec_installed
from .run import PY, QEMU_IMG, QEMU_IO, byte_compile, sh

# This interpreter's console script, else ``-m``: never another ``blockdrv``
# found on PATH (a pyenv shim alone costs more than the command)
_SCRIPT = os.path.join(os.path.dirname(PY), "blockdrv")
BD = [_SCRIPT] if os.access(_SCRIPT, os.X_OK) else [PY, "-m", "blockdrv"]

MiB = 1 << 20
TARGET = 4.0
FLOOR = "import re, argparse; argparse.ArgumentParser().parse_args([])"


def make_images(work: str) -> dict[str, tuple[str, str]]:
    """label -> (path, format); made with qemu-img/qemu-io, kept in ``work``."""
    j = lambda name: os.path.join(work, name)          # noqa: E731
    images = {"vhdx 20G 200x1M": (j("s20g.vhdx"), "vhdx"),
              "vhdx 1T 1M-blocks (1M BAT entries)": (j("s1t.vhdx"), "vhdx"),
              "raw 1G": (j("s1g.raw"), "raw"),
              "qcow2 1G": (j("s1g.qcow2"), "qcow2")}
    spread = {"s20g.vhdx": ("20G", 97), "s1t.vhdx": ("1T", 5003)}
    for path, fmt in images.values():
        if os.path.exists(path):
            continue
        name = os.path.basename(path)
        if fmt == "vhdx":
            size, stride = spread[name]
            sh(QEMU_IMG, "create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, size)
            cmds = []
            for i in range(200):
                cmds += ["-c", f"write -P {i % 250 + 1} {i * stride * MiB} 1M"]
        else:
            sh(QEMU_IMG, "create", "-q", "-f", fmt, path, "1G")
            cmds = ["-c", "write -P 1 0 64M", "-c", "write -P 2 512M 64M",
                    "-c", "write -P 3 1000M 1M"]
        sh(QEMU_IO, "-f", fmt, *cmds, path)
    return images


def rows(images: dict[str, tuple[str, str]]) -> list[tuple[str, list[str], list[str]]]:
    """(label, blockdrv command, qemu command)."""
    out = []
    for label, (path, fmt) in images.items():
        # map as JSON: qemu-img's human map refuses a vhdx (no host offsets)
        for cmd in (["info"], ["check"], ["map", "--output=json"]):
            out.append((f"{cmd[0]} {label}", [*BD, *cmd, "-f", fmt, path],
                        [QEMU_IMG, *cmd, "-f", fmt, path]))
        io = ["-f", fmt, "-r", "-c", "read 0 4k", path]
        out.append((f"io read 4k {label}", [*BD, "io", *io], [QEMU_IO, *io]))
    return out


def wall(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, the child's CPU seconds, user + system): on a shared
    machine CPU time is the steadier figure -- waiting for a core is not."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    t = time.perf_counter() - t0
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    # check: 0 on a clean image, 63 for a format without checks (raw), as qemu
    if code not in (0, 63):
        raise RuntimeError(f"{' '.join(cmd)}: exit {code}\n{err.decode()}")
    return t, usage.ru_utime + usage.ru_stime


def measure(table, reps: int) -> list[tuple]:
    """(label, blockdrv median, qemu median, blockdrv IQR, qemu IQR, blockdrv
    median CPU, qemu median CPU)."""
    base = ("python -c pass", [PY, "-c", "pass"], [PY, "-c", "pass"])
    # what any pip console script with an argparse command line pays before
    # its first own line: pip's script template imports re (with enum,
    # functools, collections), argparse adds gettext and locale
    floor = ("python -c 'import re, argparse'", [PY, "-c", FLOOR], [PY, "-c", FLOOR])
    table = [base, floor, *table]
    samples = {label: ([], []) for label, _, _ in table}
    for rep in range(reps):
        for label, bd, qemu in table:
            first, second = ((bd, 0), (qemu, 1)) if rep % 2 == 0 else ((qemu, 1), (bd, 0))
            for cmd, side in (first, second):
                samples[label][side].append(wall(cmd))

    def iqr(xs):
        q = statistics.quantiles(xs, n=4)
        return q[2] - q[0]
    out = []
    for label, _, _ in table:
        b, q = samples[label]
        bw, qw = [x[0] for x in b], [x[0] for x in q]
        out.append((label, statistics.median(bw), statistics.median(qw), iqr(bw), iqr(qw),
                    statistics.median(x[1] for x in b), statistics.median(x[1] for x in q)))
    return out


def report(results, reps: int, machine: str) -> str:
    py0, py0_cpu = results[0][1], results[0][5]
    fl, fl_cpu = results[1][1], results[1][5]
    lines = [f"Machine: {machine}, {time.strftime('%Y-%m-%d')}. {reps} alternated runs "
             f"(ABBA) per row, medians (IQR in the notes); `python -c pass`: "
             f"{py0 * 1e3:.1f} ms wall, {py0_cpu * 1e3:.1f} ms CPU; the floor of a pip "
             f"console script with an argparse command line (`import re, argparse` and an "
             f"empty parse): {fl * 1e3:.1f} ms wall, {fl_cpu * 1e3:.1f} ms CPU.  The ratio "
             "is of wall times; the CPU ratio (user + system of the child) is the steadier "
             "one on a loaded machine.", "",
             "| command | blockdrv | qemu | ratio | CPU ratio | target | met | notes |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for label, b, q, ib, iq, bc, qc in results[2:]:
        ratio = b / q
        lines.append(f"| {label} | {b * 1e3:.1f} ms | {q * 1e3:.1f} ms | {ratio:.2f} | "
                     f"{bc / qc if qc else float('inf'):.2f} | <= {TARGET:g}x | "
                     f"{'yes' if ratio <= TARGET else 'no'} | "
                     f"IQR {ib * 1e3:.1f} vs {iq * 1e3:.1f} ms; CPU {bc * 1e3:.1f} vs "
                     f"{qc * 1e3:.1f} ms; beyond python start-up {(b - py0) * 1e3:.1f} ms, "
                     f"beyond the console-script floor {(b - fl) * 1e3:.1f} ms; the floor "
                     f"alone is {fl / q:.2f}x qemu's command |")
    return "\n".join(lines)


# Runs one command as ``python -m blockdrv`` does, then names on stderr every
# module it loaded: -X importtime alone misses the ones importlib.import_module
# loads (the drivers, the command modules).
_RUN_AND_LIST = ("import sys, blockdrv.cli\n"
                 "try:\n    rc = blockdrv.cli.main(sys.argv[1:])\n"
                 "finally:\n    sys.stderr.write('MODULES ' + ' '.join(sys.modules) + '\\n')\n"
                 "sys.exit(rc)")


def imports(table) -> str:
    """Per blockdrv command: modules loaded, numpy or not, the slowest imports."""
    lines = []
    for label, bd, _ in table:
        args = bd[1:] if bd[0] != PY else bd[3:]
        res = subprocess.run([PY, "-X", "importtime", "-c", _RUN_AND_LIST, *args],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        entries, loaded = [], []
        for line in res.stderr.splitlines():
            if line.startswith("MODULES "):
                loaded = line.split()[1:]
            if not line.startswith("import time:"):
                continue
            parts = [x.strip() for x in line[len("import time:"):].split("|")]
            if len(parts) == 3 and parts[1].isdigit():
                entries.append((int(parts[1]), parts[2]))
        top = ", ".join(f"{n} {us / 1000:.1f}" for us, n in sorted(entries)[-6:][::-1])
        watched = ("numpy", "inspect", "dataclasses", "pluggy", "argparse", "typing", "re",
                   "enum", "collections")
        heavy = [m for m in watched if m in loaded]
        lines.append(f"{label}: {len(loaded)} modules; of {', '.join(watched)}: "
                     f"{', '.join(heavy) or 'none'}; "
                     f"slowest (ms, cumulative): {top}")
    return "\n".join(lines)


def profile(table, which: str) -> str:
    """pyinstrument's tree of the first blockdrv row whose label contains ``which``."""
    for label, bd, _ in table:
        if which in label:
            args = bd[1:] if bd[0] != PY else bd[3:]
            res = subprocess.run([PY, "-m", "pyinstrument", "-i", "0.0002", "-m", "blockdrv",
                                  *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
            return f"{label}:\n{res.stdout}"
    raise SystemExit(f"no row matches {which!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in-place", action="store_true",
                    help="time the blockdrv of this interpreter (default: an ordinary, "
                         "non-editable install of this checkout in a venv of its own)")
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--only", help="run only rows whose label contains this text")
    p.add_argument("--imports", action="store_true", help="report imports, time nothing")
    p.add_argument("--profile", metavar="ROW", help="pyinstrument tree of one row")
    p.add_argument("--workdir", help="keep the images here (default: a temp dir, removed)")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--machine", default=f"{os.cpu_count()} cores, shared/noisy")
    a = p.parse_args(argv)
    reexec_installed("benchmarks.startup", sys.argv[1:] if argv is None else argv)
    work = a.workdir or tempfile.mkdtemp(prefix="blockdrv-startup-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    byte_compile()
    try:
        table = rows(make_images(work))
        if a.only:
            table = [r for r in table if a.only in r[0]]
        if a.imports:
            print(imports(table))
            return 0
        if a.profile:
            print(profile(table, a.profile))
            return 0
        text = report(measure(table, a.reps), a.reps, a.machine)
        print(text)
        if a.markdown:
            with open(a.markdown, "w") as f:
                f.write(text + "\n")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
