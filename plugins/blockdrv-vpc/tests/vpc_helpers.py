"""Helpers of the vpc tests: run both tools, compare VHD files after masking
the footer's run-dependent fields (head and tail copies)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from blockdrv.testing.compare import compare_files
from blockdrv.testing.qemu import QEMU_IMG, run_qemu_img


KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def run_blockdrv(*args, timeout: float = 600) -> tuple[int, str, str]:
    """``blockdrv ARGS...`` as a process (the installed CLI)."""
    p = subprocess.run([sys.executable, "-m", "blockdrv", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def run_tool(tool: str, *args) -> tuple[int, str, str]:
    return run_qemu_img(*args) if tool == "qemu" else run_blockdrv(*args)


_PROG = re.compile(r"^(qemu-img|qemu-io|blockdrv)(: )", re.M)


def unprog(text: str) -> str:
    """Messages with the program name masked."""
    return _PROG.sub(r"PROG\2", text)


def compare_vpc(a, b, scratch=None) -> str | None:
    """None when the two VHD files are identical after masking the footer
    copies' run-dependent fields (the plugin's normalizer, which the harness
    finds through the ``blockdrv.normalizers`` entry point)."""
    diff = compare_files(str(a), str(b), "vpc")
    return None if diff is None else str(diff)


def info_json(tool: str, path, fmt: str | None = "vpc") -> tuple[int, dict | str]:
    args = ["info", "--output=json", *(["-f", fmt] if fmt else []), str(path)]
    rc, out, err = run_tool(tool, *args)
    if rc:
        return rc, unprog(err)
    data = json.loads(out)
    data.pop("format-specific", None)     # blockdrv's vpc names the creator there
    data.pop("actual-size", None)         # host allocation: not the format's business
    return rc, data


def map_json(tool: str, path, fmt: str = "vpc"):
    rc, out, err = run_tool(tool, "map", "--output=json", "-f", fmt, str(path))
    return (rc, json.loads(out)) if rc == 0 else (rc, unprog(err))


def virtual_size(path, fmt: str = "vpc") -> int:
    rc, out, err = run_qemu_img("info", "--output=json", "-f", fmt, str(path))
    assert rc == 0, err
    return json.loads(out)["virtual-size"]


__all__ = ["KiB", "MiB", "GiB", "QEMU_IMG", "run_blockdrv", "run_tool", "unprog",
           "compare_vpc", "info_json", "map_json", "virtual_size"]


class VpcFormatSpec:
    """What a format conformance suite needs to know about vpc, in one place,
    so that a ``FormatConformance`` subclass is five lines::

        class TestVpc(VpcFormatSpec, FormatConformance):
            pass
    """

    fmt = "vpc"
    create_variants = [{}, {"force_size": True}, {"subformat": "fixed"},
                       {"subformat": "fixed", "force_size": True}]
    max_size = 2040 << 30
    supports_check = False          # as qemu: exit 63
    supports_resize = False
    supports_discard = False        # discards are dropped, zero writes write zeros

    @staticmethod
    def normalize(data: bytes) -> bytes:
        from blockdrv_vpc.normalize import normalize
        return normalize(data)
