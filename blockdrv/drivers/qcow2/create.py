"""``create -f qcow2``, byte for byte as qemu-img 7.2 (qcow2_co_create).

qemu writes a header cluster and an empty refcount table (cluster 1, whose
entry 0 names cluster 2) and refcount block, reopens the image, allocates
clusters 0-2 through its allocator, rewrites the full header (feature
table), grows the L1 table to the size (allocated like any cluster), names
the backing file, and with ``preallocation`` allocates every L2 table and
data cluster.  Replaying those steps through :class:`.alloc.Allocator` gives
the same file, refcount table growth included.
"""

from __future__ import annotations

from blockdrv.driver import InvalidArgumentError, UnsupportedError, create_file
from blockdrv.options import CreateOption

from . import l2 as _l2
from .alloc import Allocator
from .constants import (COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZSTD, DEFAULT_CLUSTER_SIZE,
                        INCOMPAT_COMPRESSION, INCOMPAT_EXTL2, MAX_CLUSTER_BITS,
                        MAX_L1_BYTES, MIN_CLUSTER_BITS)
from .header import Header

_V3 = "use version=v3 or greater"

# qemu 7.2's qcow2 create options, in the order its "Formatting" line prints
# them (`-o help` sorts them by name); defaults as that line shows them.
CREATE_OPTS = [
    CreateOption("encryption", "bool",
                 "Encrypt the image with format 'aes'. (Deprecated in favor of "
                 "encrypt.format=aes)"),
    CreateOption("encrypt.format", "string",
                 "Encrypt the image, format choices: 'aes', 'luks'"),
    CreateOption("encrypt.key-secret", "string",
                 "ID of secret providing qcow AES key or LUKS passphrase"),
    CreateOption("encrypt.cipher-alg", "string", "Name of encryption cipher algorithm"),
    CreateOption("encrypt.cipher-mode", "string", "Name of encryption cipher mode"),
    CreateOption("encrypt.ivgen-alg", "string", "Name of IV generator algorithm"),
    CreateOption("encrypt.ivgen-hash-alg", "string",
                 "Name of IV generator hash algorithm"),
    CreateOption("encrypt.hash-alg", "string", "Name of encryption hash algorithm"),
    CreateOption("encrypt.iter-time", "number", "Time to spend in PBKDF in milliseconds"),
    CreateOption("cluster_size", "size", "qcow2 cluster size", DEFAULT_CLUSTER_SIZE),
    CreateOption("extended_l2", "bool", "Extended L2 tables", False),
    CreateOption("preallocation", "string",
                 "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    CreateOption("compression_type", "string",
                 "Compression method used for image cluster compression", "zlib"),
    CreateOption("size", "size", "Virtual disk size"),
    CreateOption("compat", "string", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    CreateOption("backing_file", "string", "File name of a base image"),
    CreateOption("backing_fmt", "string", "Image format of the base image"),
    CreateOption("data_file", "string", "File name of an external data file"),
    CreateOption("data_file_raw", "bool",
                 "The external data file must stay valid as a raw image"),
    CreateOption("lazy_refcounts", "bool", "Postpone refcount updates", False),
    CreateOption("refcount_bits", "number", "Width of a reference count entry in bits", 16),
]

VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}             # compat= -> header version
PREALLOC_MODES = ("off", "metadata", "falloc", "full")
_INT_MAX = (1 << 31) - 1


def cluster_size(options: dict) -> int:
    """``cluster_size=``, checked as qemu's create and measure check it."""
    cs = options.get("cluster_size", DEFAULT_CLUSTER_SIZE)
    cbits = cs.bit_length() - 1
    if cs & (cs - 1) or not MIN_CLUSTER_BITS <= cbits <= MAX_CLUSTER_BITS:
        raise InvalidArgumentError("Cluster size must be a power of two between "
                                   f"{1 << MIN_CLUSTER_BITS} and "
                                   f"{1 << (MAX_CLUSTER_BITS - 10)}k")
    return cs


def refcount_bits(options: dict, version: int, hint: str = _V3) -> int:
    """``refcount_bits=``, checked as qemu's create and measure check it
    (``hint``: how each names the compatibility option)."""
    bits = options.get("refcount_bits", 16)
    if bits <= 0 or bits > 64 or bits & (bits - 1):
        raise InvalidArgumentError("Refcount width must be a power of two and may not "
                                   "exceed 64 bits")
    if version < 3 and bits != 16:
        raise InvalidArgumentError("Different refcount widths than 16 bits require "
                                   f"compatibility level 1.1 or above ({hint})")
    return bits


def plan_header(options: dict) -> tuple[Header, str]:
    """Validate the options as qemu does (its messages, its order); the
    header to create and the preallocation mode.  No I/O."""
    if options.get("encryption") or any(k.startswith("encrypt.") for k in options):
        raise UnsupportedError("Encrypted qcow2 images are not supported by blockdrv")
    if "data_file" in options or options.get("data_file_raw"):
        raise UnsupportedError("External data files are not supported by blockdrv's qcow2")
    cs = cluster_size(options)
    cbits = cs.bit_length() - 1
    compat = options.get("compat", "v3")
    if compat not in VERSIONS:
        raise InvalidArgumentError(f"Parameter 'version' does not accept value '{compat}'")
    version = VERSIONS[compat]
    prealloc = options.get("preallocation", "off")
    if prealloc not in PREALLOC_MODES:
        raise InvalidArgumentError(
            f"Parameter 'preallocation' does not accept value '{prealloc}'")
    ctype = options.get("compression_type", "zlib")
    if ctype not in ("zlib", "zstd"):
        raise InvalidArgumentError(
            f"Parameter 'compression-type' does not accept value '{ctype}'")
    extl2 = bool(options.get("extended_l2", False))
    if extl2 and version < 3:
        raise InvalidArgumentError("Extended L2 entries are only supported with "
                                   f"compatibility level 1.1 and above ({_V3})")
    if extl2 and cs < 16384:
        raise InvalidArgumentError("Extended L2 entries are only supported with cluster "
                                   "sizes of at least 16384 bytes")
    bits = refcount_bits(options, version)
    backing, backing_fmt = options.get("backing_file"), options.get("backing_fmt")
    if backing_fmt and not backing:
        raise InvalidArgumentError("Backing format cannot be used without backing file")
    if backing and not backing_fmt:
        raise InvalidArgumentError("Backing file specified without backing format")
    if backing and prealloc != "off" and not extl2:
        raise InvalidArgumentError("Backing file and preallocation can only be used at "
                                   "the same time if extended_l2 is on")
    lazy = bool(options.get("lazy_refcounts", False))
    if version < 3 and lazy:
        raise InvalidArgumentError("Lazy refcounts only supported with compatibility "
                                   f"level 1.1 and above ({_V3})")
    if version < 3 and ctype != "zlib":
        raise InvalidArgumentError("Non-zlib compression type is only supported with "
                                   f"compatibility level 1.1 and above ({_V3})")
    size = -(-options.get("size", 0) // 512) * 512
    h = Header(version=version, cluster_bits=cbits, size=size,
               refcount_order=bits.bit_length() - 1, refcount_table_offset=cs,
               refcount_table_clusters=1, backing_file=backing, backing_format=backing_fmt)
    if lazy:
        h.compatible_features |= COMPAT_LAZY_REFCOUNTS
    if extl2:
        h.incompatible_features |= INCOMPAT_EXTL2
    if ctype == "zstd":
        h.incompatible_features |= INCOMPAT_COMPRESSION
        h.compression_type = COMPRESSION_ZSTD
    if l1_entries(h) * 8 > MAX_L1_BYTES:
        raise InvalidArgumentError("The image size is too large for file format 'qcow2' "
                                   "(try using a larger cluster size)")
    return h, prealloc


def l2_entries(h: Header) -> int:
    ext = bool(h.incompatible_features & INCOMPAT_EXTL2)
    return h.cluster_size // _l2.l2_entry_size(ext)


def l1_entries(h: Header) -> int:
    """qemu's size_to_l1: L1 entries a virtual size needs."""
    per_l1 = h.cluster_size * l2_entries(h)
    return -(-h.size // per_l1)


def create_qcow2(filename: str, options: dict) -> None:
    h, prealloc = plan_header(options)
    bs = create_file(filename)
    try:
        Builder(bs, h).build(prealloc)
        bs.flush()
    finally:
        bs.close()


class Builder:
    """qemu's create steps over a fresh file, through the allocator."""

    def __init__(self, bs, h: Header) -> None:
        self.bs, self.h = bs, h
        cs = h.cluster_size
        self.alloc = Allocator(h.cluster_bits, h.refcount_order, [2 * cs] + [0] * (cs // 8 - 1),
                               cs, self._read, self._write, self._set_table)
        self.l1: list[int] = []

    def _read(self, offset: int, n: int) -> bytes:
        return bytes(self.bs.pread(offset, n))

    def _write(self, offset: int, data: bytes) -> None:
        self.bs.pwrite(offset, data)

    def _set_table(self, offset: int, clusters: int) -> None:
        self.h.refcount_table_offset, self.h.refcount_table_clusters = offset, clusters

    def build(self, prealloc: str) -> None:
        h, cs = self.h, self.h.cluster_size
        size = h.size
        # qemu's first header has no size, L1 or extensions; the final one is
        # written last here (same bytes, one write).
        first = Header(version=h.version, cluster_bits=h.cluster_bits,
                       refcount_order=h.refcount_order, refcount_table_offset=cs,
                       refcount_table_clusters=1)
        self._write(0, first.pack())
        self._write(cs, (2 * cs).to_bytes(8, "big") + bytes(2 * cs - 8))
        self.alloc.alloc(3 * cs)
        n = l1_entries(h)
        if n:
            off = self.alloc.alloc(n * 8)
            self._write(off, bytes(n * 8))
            h.l1_size, h.l1_table_offset = n, off
            self.l1 = [0] * n
        if prealloc == "metadata" and size:
            self._preallocate(size)
        elif prealloc in ("falloc", "full"):
            # even for size 0: qemu's truncate still moves the refcount table
            self._preallocate_data(size, prealloc)
        self._write(0, h.pack())

    # -- preallocation=metadata (qemu's preallocate_co over qcow2_alloc_host_offset) --

    def _preallocate(self, size: int) -> None:
        cs = self.h.cluster_size
        chunk = (_INT_MAX // cs) * cs
        unit = cs // _l2.SUBCLUSTERS if self.h.incompatible_features & INCOMPAT_EXTL2 else cs
        offset = 0
        host = end = 0
        while offset < size:
            cur = min(size - offset, chunk)
            done, host = self._alloc_host_range(offset, cur)
            # the file ends with the last whole subcluster (qemu 7.2 rounds
            # the last run up to its allocation unit)
            end = host + -(-done // unit) * unit
            offset += done
        if end > self.bs.total_size:
            self.bs.truncate(end)

    # -- preallocation=falloc/full (qemu's qcow2_co_truncate growing a file) --------

    def _preallocate_data(self, size: int, mode: str) -> None:
        """Refcounts for everything first (a new table after the file's end,
        the old one freed), then one contiguous data area after them, which
        the file protocol preallocates, then the L2 tables, allocated as
        any cluster while their entries are linked."""
        cs, cbits = self.h.cluster_size, self.h.cluster_bits
        per_l2 = l2_entries(self.h)
        end = -(-self.bs.total_size // cs) * cs
        clusters = -(-size // cs)
        # +1 L2 table: the range may start and end inside one
        start = self.alloc.refcount_area(end, clusters + -(-clusters // per_l2) + 1, True)
        if self.alloc.alloc_at(start, clusters) != clusters:
            raise InvalidArgumentError("qcow2: the preallocated area is not free")
        self.bs.truncate(start + clusters * cs, prealloc=mode)
        index = 0
        while index < clusters:
            l1i, l2i = divmod(index, per_l2)
            n = min(clusters - index, per_l2 - l2i)
            self._link(self._l2_table(l1i), l2i, start + (index << cbits), n)
            index += n

    def _alloc_host_range(self, offset: int, nbytes: int) -> tuple[int, int]:
        """Allocate from ``offset`` while host clusters stay contiguous (the
        first run anywhere); returns (bytes, host offset of the first)."""
        cs, cbits = self.h.cluster_size, self.h.cluster_bits
        per_l2 = l2_entries(self.h)
        start, remaining = offset, nbytes
        first_host = None
        host = None
        while remaining:
            index = start >> cbits
            l1i, l2i = divmod(index, per_l2)
            l2_off = self._l2_table(l1i)
            n = min(-(-remaining // cs), per_l2 - l2i, _INT_MAX >> cbits)
            if host is None:
                host = self.alloc.alloc(n * cs)
            else:
                n = self.alloc.alloc_at(host, n)
                if n == 0:
                    break
            self._link(l2_off, l2i, host, n)
            if first_host is None:
                first_host = host
            done = min(n * cs, remaining)
            start += done
            remaining -= done
            host += n * cs
        return nbytes - remaining, first_host

    def _l2_table(self, l1i: int) -> int:
        if self.l1[l1i]:
            return self.l1[l1i] & _l2.L1E_OFFSET_MASK
        cs = self.h.cluster_size
        off = self.alloc.alloc(cs)
        self._write(off, bytes(cs))
        self.l1[l1i] = off | _l2.OFLAG_COPIED
        self._write(self.h.l1_table_offset + l1i * 8, self.l1[l1i].to_bytes(8, "big"))
        return off

    def _link(self, l2_off: int, l2i: int, host: int, n: int) -> None:
        ext = bool(self.h.incompatible_features & INCOMPAT_EXTL2)
        esize = _l2.l2_entry_size(ext)
        cs = self.h.cluster_size
        buf = bytearray()
        for i in range(n):
            buf += ((host + i * cs) | _l2.OFLAG_COPIED).to_bytes(8, "big")
            if ext:
                buf += bytes(8)             # preallocated: no subcluster allocated
        self._write(l2_off + l2i * esize, bytes(buf))
