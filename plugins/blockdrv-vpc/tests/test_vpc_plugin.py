"""The plugin as a distribution: found by its entry point, importing only
blockdrv's public driver API, absent from the core, taking over from the
core's "vpc format, which blockdrv does not support" refusal."""

from __future__ import annotations

import ast
import pathlib
from importlib.metadata import distribution, entry_points

from blockdrv.testing.qemu import qemu_img_create

from vpc_helpers import MiB, run_blockdrv

PKG = pathlib.Path(__file__).resolve().parents[1] / "blockdrv_vpc"


def test_entry_point_names_the_driver():
    eps = [ep for ep in entry_points(group="blockdrv.drivers") if ep.name == "vpc"]
    assert len(eps) == 1 and eps[0].value == "blockdrv_vpc:driver"
    assert eps[0].dist.name == "blockdrv-vpc"
    assert eps[0].load().format_name == "vpc"


def test_core_distribution_does_not_bring_vpc():
    core = {ep.name for ep in distribution("blockdrv").entry_points
            if ep.group == "blockdrv.drivers"}
    assert "vpc" not in core and {"raw", "vhdx"} <= core


def test_plugin_imports_only_the_public_driver_api():
    """The driver imports blockdrv.driver only; its test helper module
    (the normalizer the harness loads) blockdrv.testing only."""
    seen = set()
    for path in PKG.glob("*.py"):
        if path.name == "testing.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                seen.add(node.module)
            elif isinstance(node, ast.Import):
                seen.update(a.name for a in node.names)
    blockdrv = {m for m in seen if m == "blockdrv" or m.startswith("blockdrv.")}
    assert blockdrv == {"blockdrv.driver"}, blockdrv
    helper = ast.parse((PKG / "testing.py").read_text())
    mods = {n.module for n in ast.walk(helper) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert all(m.startswith("blockdrv.testing") for m in mods), mods


def test_probe_hands_vhd_to_the_plugin(tmp_path):
    """Without -f a dynamic VHD is opened by this driver, no longer refused as
    'vpc format, which blockdrv does not support'."""
    path = tmp_path / "d.vhd"
    qemu_img_create(path, "vpc", 8 * MiB)
    rc, out, err = run_blockdrv("info", path)
    assert rc == 0, err
    assert "file format: vpc" in out and "does not support" not in err
    rc, out, err = run_blockdrv("io", "-c", "write -P 0x5a 0 4k", "-c", "read -P 0x5a 0 4k",
                                path)
    assert rc == 0 and "Pattern verification failed" not in out, out + err


def test_info_names_the_creator(tmp_path):
    path = tmp_path / "d.vhd"
    qemu_img_create(path, "vpc", 8 * MiB, force_size=True)
    rc, out, err = run_blockdrv("info", path)
    assert rc == 0, err
    assert "creator: QEMU (force_size)" in out
    assert "creator app: qem2" in out


def test_check_is_unsupported_as_in_qemu(tmp_path):
    path = tmp_path / "d.vhd"
    qemu_img_create(path, "vpc", 8 * MiB)
    rc, out, err = run_blockdrv("check", path)
    assert rc == 63 and err.strip() == "blockdrv: This image format does not support checks"
