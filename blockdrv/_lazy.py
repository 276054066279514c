"""Start-up: what a short command may know without importing a driver.

The registry (:mod:`blockdrv.plugins`) reads the ``blockdrv.drivers`` entry
points at first use but imports a driver module only when its name is looked
up -- ``info x.vhdx`` imports the file protocol and the vhdx driver, not nbd,
fsspec, blkdebug, memory or any other format.

Probing (``bdrv_probe``) stays a hook: a loaded driver is asked through it.
A driver not loaded yet may declare a *light probe* in the entry-point group
``blockdrv.probes`` -- ``name = module:callable``, called as
``callable(buf=..., filename=...) -> score`` like the hook, from a module
that is cheap to import -- and the registry calls that instead of importing
the driver; only the winner is then imported.  A driver that declares none
is imported to be probed (correct, only slower).  A light probe must score
exactly as the driver's hook does (tests/unit/test_lazy.py checks the
built-in ones); protocols declare :func:`not_a_format`.

The built-in drivers' light probes are below (also declared in
pyproject.toml; this table is the fallback for an uninstalled tree).
"""

from __future__ import annotations

VHDX_SIGNATURE = b"vhdxfile"


def not_a_format(buf=None, filename=None) -> int:
    """The light probe of a protocol driver: it never claims an image."""
    return 0


def probe_raw(buf=None, filename=None) -> int:
    """raw: anything, at the lowest score (as raw_probe)."""
    return 1


def probe_vhdx(buf=None, filename=None) -> int:
    """vhdx: the file identifier's signature (as vhdx_probe)."""
    return 100 if bytes(buf[:8]) == VHDX_SIGNATURE else 0


def probe_qcow2(buf=None, filename=None) -> int:
    """qcow2: the magic and a version of 2 or more (as qcow2_probe)."""
    head = bytes(buf[:8])
    return 100 if head[:4] == b"QFI\xfb" and int.from_bytes(head[4:8], "big") >= 2 else 0


BUILTIN_PROBES = {
    "file": "blockdrv._lazy:not_a_format",
    "memory": "blockdrv._lazy:not_a_format",
    "blkdebug": "blockdrv._lazy:not_a_format",
    "nbd": "blockdrv._lazy:not_a_format",
    "fsspec": "blockdrv._lazy:not_a_format",
    "raw": "blockdrv._lazy:probe_raw",
    "vhdx": "blockdrv._lazy:probe_vhdx",
    "qcow2": "blockdrv._lazy:probe_qcow2",
}
