"""CRC-32C as VHDX uses it: over a whole structure, its checksum field as zero.

Headers (4 KiB), region tables (64 KiB) and log entries carry a little-endian
CRC-32C computed with the checksum field itself replaced by zeros.  We feed the
bytes around the field to an incremental CRC instead of copying the buffer.
"""

from __future__ import annotations

import struct
import sys


def _load_crc32c():
    """The ``crc32c`` package's C function, without running the package's
    ``__init__``: that imports importlib.metadata (for ``__version__``) and
    argparse (for its CLI), ~10 ms of a short command's start-up.  The
    extension module is loaded from the package directory under its own name
    (so a later ``import crc32c`` reuses it); anything unexpected falls back
    to the plain import."""
    if "crc32c" not in sys.modules:
        try:
            import importlib.machinery
            import importlib.util
            import os
            spec = importlib.util.find_spec("crc32c")
            for folder in spec.submodule_search_locations or ():
                for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                    path = os.path.join(folder, "_crc32c" + suffix)
                    if not os.path.exists(path):
                        continue
                    name = "crc32c._crc32c"
                    loader = importlib.machinery.ExtensionFileLoader(name, path)
                    ext_spec = importlib.util.spec_from_file_location(name, path,
                                                                      loader=loader)
                    mod = importlib.util.module_from_spec(ext_spec)
                    loader.exec_module(mod)
                    sys.modules[name] = mod
                    return mod.crc32c
        except Exception:  # noqa: BLE001 - any surprise: the ordinary import
            sys.modules.pop("crc32c._crc32c", None)
    from crc32c import crc32c
    return crc32c


crc32c = _load_crc32c()

_ZEROS4 = bytes(4)


def compute(buf, crc_offset: int = 4) -> int:
    """CRC-32C of ``buf`` with the 4 bytes at ``crc_offset`` taken as zero."""
    view = memoryview(buf).cast("B")
    crc = crc32c(view[:crc_offset])
    crc = crc32c(_ZEROS4, crc)
    return crc32c(view[crc_offset + 4:], crc)


def stored(buf, crc_offset: int = 4) -> int:
    """The checksum value stored in ``buf``."""
    return struct.unpack_from("<I", buf, crc_offset)[0]


def verify(buf, crc_offset: int = 4) -> bool:
    """True if the checksum stored in ``buf`` matches its contents."""
    return stored(buf, crc_offset) == compute(buf, crc_offset)


def seal(buf: bytearray, crc_offset: int = 4) -> int:
    """Compute the checksum of ``buf`` and store it in place; returns it."""
    crc = compute(buf, crc_offset)
    struct.pack_into("<I", buf, crc_offset, crc)
    return crc
