"""blockdrv nbd vs qemu-nbd: ``qemu-img convert -O raw nbd+unix://...`` throughput.

    python -m benchmarks.nbd                    # 256 MiB images, 5 repetitions
    python -m benchmarks.nbd --size 1024 --reps 7

Both servers serve the same image read-only (-r -t) on a unix socket: a raw
file and a dynamic VHDX, each fully written with random data.  Each
repetition converts once from each server, the order flipping every
repetition (ABBA, as benchmarks/run.py) so neither always gets the warmer
page cache.  The table shows median seconds, MiB/s and the blockdrv/qemu-nbd
time ratio; blockdrv's server logs (-v) give the most requests one client
had in flight.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from .install import reexec_installed

MiB = 1 << 20
QEMU_IMG = shutil.which("qemu-img") or "/usr/bin/qemu-img"
QEMU_NBD = shutil.which("qemu-nbd") or "/usr/bin/qemu-nbd"
# the console script of this interpreter (``-m`` would import a checkout in
# the current directory before the installed package)
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "blockdrv")
BD = [_SCRIPT] if os.access(_SCRIPT, os.X_OK) else [sys.executable, "-m", "blockdrv"]


def _wait_socket(path: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start: {proc.args}")
        time.sleep(0.02)


def start(kind: str, image: str, fmt: str, sock: str, log) -> subprocess.Popen:
    if kind == "bd":
        cmd = [*BD, "nbd", "-v", "-r", "-t", "-f", fmt, "-k", sock, image]
    else:
        cmd = [QEMU_NBD, "-r", "-t", "-f", fmt, "-k", sock, image]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    _wait_socket(sock, proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def convert(sock: str, out: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([QEMU_IMG, "convert", "-f", "raw", "-O", "raw",
                    f"nbd+unix:///?socket={sock}", out], check=True)
    return time.perf_counter() - t0


def make_images(work: str, size: int) -> dict[str, tuple[str, str]]:
    raw = os.path.join(work, "data.raw")
    with open(raw, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n
    vhdx = os.path.join(work, "data.vhdx")
    subprocess.run([QEMU_IMG, "convert", "-f", "raw", "-O", "vhdx", raw, vhdx], check=True)
    return {"raw": (raw, "raw"), "vhdx (dynamic)": (vhdx, "vhdx")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="image size in MiB")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--in-place", action="store_true",
                    help="time the blockdrv of this interpreter (default: an ordinary, "
                         "non-editable install of this checkout in a venv of its own)")
    args = ap.parse_args(argv)
    reexec_installed("benchmarks.nbd", sys.argv[1:] if argv is None else argv)
    size = args.size * MiB
    with tempfile.TemporaryDirectory(prefix="bd-nbd-bench-") as work:
        images = make_images(work, size)
        out = os.path.join(work, "out.raw")
        rows = []
        inflight: list[int] = []
        for label, (image, fmt) in images.items():
            samples = {"bd": [], "qemu": []}
            for rep in range(args.reps):
                order = ("bd", "qemu") if rep % 2 == 0 else ("qemu", "bd")
                for kind in order:
                    sock = os.path.join(work, f"{kind}.sock")
                    logpath = os.path.join(work, f"{kind}.log")
                    with open(logpath, "wb") as log:
                        proc = start(kind, image, fmt, sock, log)
                        try:
                            samples[kind].append(convert(sock, out))
                        finally:
                            stop(proc)
                    if kind == "bd":
                        text = open(logpath).read()
                        inflight += [int(m) for m in re.findall(r"max (\d+) in flight", text)]
                    os.unlink(out)
                print(f"{label}: repetition {rep + 1}/{args.reps}", file=sys.stderr)
            bd = statistics.median(samples["bd"])
            q = statistics.median(samples["qemu"])
            rows.append((label, bd, q))
    print(f"qemu-img convert -O raw from NBD, {args.size} MiB, median of {args.reps}\n")
    print("| image | blockdrv nbd | qemu-nbd | ratio (time) |")
    print("|---|---|---|---|")
    for label, bd, q in rows:
        print(f"| {label} | {bd:.3f} s ({args.size / bd:.0f} MiB/s) | "
              f"{q:.3f} s ({args.size / q:.0f} MiB/s) | {bd / q:.2f}x |")
    if inflight:
        print(f"\nblockdrv nbd: max requests in flight per client: {max(inflight)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
