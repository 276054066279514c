"""The image header and its extensions (qcow2.txt "Header", "Header extensions").

``Header.parse`` checks what makes a header usable at all, with qemu's
messages; ``Header.pack`` lays out the header cluster exactly as qemu 7.2's
``qcow2_update_header`` does (header, extensions, end marker, backing name).
"""

from __future__ import annotations

import struct
from blockdrv._startup import dataclass, field

from blockdrv.errors import CorruptImageError, InvalidArgumentError, UnsupportedError

from .constants import (COMPRESSION_NAMES, COMPRESSION_ZLIB, EXT_BACKING_FORMAT,
                        EXT_DATA_FILE, EXT_END, EXT_FEATURE_TABLE, FEAT_INCOMPAT,
                        FEATURE_NAMES, INCOMPAT_COMPRESSION,
                        INCOMPAT_KNOWN, MAGIC, MAX_BACKING_FILE_NAME, MAX_CLUSTER_BITS,
                        MIN_CLUSTER_BITS, V2_HEADER_LENGTH, V3_HEADER_LENGTH,
                        V3_MIN_HEADER_LENGTH)

# Bytes 0..71 (v2) and 72..103 (v3), big-endian.
_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
assert _V2.size == 72 and _V2.size + _V3.size == 104
_EXT = struct.Struct(">II")
_FEATURE = struct.Struct(">BB46s")


@dataclass
class Extension:
    type: int
    data: bytes


@dataclass
class Header:
    version: int = 3
    cluster_bits: int = 16
    size: int = 0
    backing_file_offset: int = 0
    backing_file_size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    # from the extensions and the backing file name
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    extensions: list[Extension] = field(default_factory=list)   # every one read

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    # -- parsing ------------------------------------------------------------------

    @classmethod
    def parse(cls, buf: bytes) -> "Header":
        """Parse the header cluster ``buf`` (at least the first cluster, or
        what the file holds of it), with qemu's checks and messages."""
        buf = bytes(buf)
        if len(buf) < _V2.size or buf[:4] != MAGIC:
            raise InvalidArgumentError("Image is not in qcow2 format")
        (_, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
         nb_snap, snap_off) = _V2.unpack_from(buf)
        if version < 2 or version > 3:
            raise UnsupportedError(f"Unsupported qcow2 version {version}")
        if cbits < MIN_CLUSTER_BITS or cbits > MAX_CLUSTER_BITS:
            raise InvalidArgumentError(f"Unsupported cluster size: 2^{cbits}")
        h = cls(version=version, cluster_bits=cbits, size=size, backing_file_offset=bfo,
                backing_file_size=bfs, crypt_method=crypt, l1_size=l1_size,
                l1_table_offset=l1_off, refcount_table_offset=rt_off,
                refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap,
                snapshots_offset=snap_off)
        cs = h.cluster_size
        if version == 2:
            h.header_length = V2_HEADER_LENGTH
        else:
            if len(buf) < V3_MIN_HEADER_LENGTH:
                raise InvalidArgumentError("qcow2 header too short")
            (h.incompatible_features, h.compatible_features, h.autoclear_features,
             h.refcount_order, h.header_length) = _V3.unpack_from(buf, _V2.size)
            if h.header_length < V3_MIN_HEADER_LENGTH:
                raise InvalidArgumentError("qcow2 header too short")
            if h.header_length > cs:
                raise InvalidArgumentError("qcow2 header exceeds cluster size")
            if h.header_length > V3_MIN_HEADER_LENGTH and len(buf) > 104:
                h.compression_type = buf[104]
        if h.backing_file_offset > cs:
            raise InvalidArgumentError("Invalid backing file offset")
        h._parse_extensions(buf)
        if h.incompatible_features & ~INCOMPAT_KNOWN:
            raise UnsupportedError("Unsupported qcow2 feature(s): "
                                   + h.describe_features(FEAT_INCOMPAT,
                                                         h.incompatible_features
                                                         & ~INCOMPAT_KNOWN))
        if h.refcount_order > 6:
            raise InvalidArgumentError("Reference count entry width too large; may not "
                                       "exceed 64 bits")
        if h.compression_type not in COMPRESSION_NAMES:
            raise UnsupportedError(f"qcow2: unknown compression type: {h.compression_type}")
        if h.compression_type != COMPRESSION_ZLIB and not (
                h.incompatible_features & INCOMPAT_COMPRESSION):
            raise InvalidArgumentError("qcow2: Compression type incompatible feature bit "
                                       "must be set")
        if h.backing_file_offset:
            n = h.backing_file_size
            if n > min(MAX_BACKING_FILE_NAME, cs - h.backing_file_offset):
                raise InvalidArgumentError("Backing file name too long")
            raw = buf[h.backing_file_offset:h.backing_file_offset + n]
            h.backing_file = raw.decode("utf-8", errors="surrogateescape")
        return h

    def _parse_extensions(self, buf: bytes) -> None:
        # Extensions start after the header and end at the backing file name
        # (or the end of the cluster); qemu's qcow2_read_extensions.
        end = self.backing_file_offset or self.cluster_size
        pos = self.header_length
        while pos < end:
            if pos + _EXT.size > len(buf):
                return                  # the file ends: zeros, the end marker
            etype, elen = _EXT.unpack_from(buf, pos)
            pos += _EXT.size
            # qemu checks the length first, even the end marker's
            if elen > end - pos:
                raise InvalidArgumentError("Header extension too large")
            if etype == EXT_END:
                return
            # the part past the end of a short file reads as zeros, as in qemu
            data = buf[pos:pos + elen].ljust(elen, b"\0")
            pos += (elen + 7) & ~7
            self.extensions.append(Extension(etype, data))
            if etype == EXT_BACKING_FORMAT:
                if elen >= 1024:
                    raise InvalidArgumentError(
                        f"ERROR: ext_backing_format: len={elen} too large (>=1024)")
                self.backing_format = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif etype == EXT_FEATURE_TABLE:
                for i in range(elen // _FEATURE.size):
                    ftype, bit, name = _FEATURE.unpack_from(data, i * _FEATURE.size)
                    self.feature_names[(ftype, bit)] = name.split(b"\0", 1)[0].decode(
                        "utf-8", "replace")
            elif etype == EXT_DATA_FILE:
                self.data_file = data.decode("utf-8", "replace")

    def describe_features(self, ftype: int, mask: int) -> str:
        """qemu's report_unsupported_feature: names from the table, then the
        remaining bits as "Unknown incompatible feature: %x"."""
        parts = []
        for bit in range(64):
            if mask & (1 << bit) and (ftype, bit) in self.feature_names:
                parts.append(self.feature_names[(ftype, bit)])
                mask &= ~(1 << bit)
        if mask:
            parts.append(f"Unknown incompatible feature: {mask:x}")
        return ", ".join(parts)

    # -- packing ------------------------------------------------------------------

    def pack(self) -> bytes:
        """The header cluster as qemu's qcow2_update_header writes it."""
        cs = self.cluster_size
        buf = bytearray(cs)
        hlen = V2_HEADER_LENGTH if self.version == 2 else V3_HEADER_LENGTH
        pos = hlen
        exts = []
        if self.backing_format:
            exts.append((EXT_BACKING_FORMAT, self.backing_format.encode()))
        if self.data_file:
            exts.append((EXT_DATA_FILE, self.data_file.encode()))
        if self.version >= 3 and cs > 4096:
            # qemu 7.2 leaves the 392-byte table out of clusters of 4 KiB and
            # less (room for the backing file name)
            exts.append((EXT_FEATURE_TABLE, b"".join(
                _FEATURE.pack(t, b, n.encode()) for t, b, n in FEATURE_NAMES)))
        for etype, data in exts:
            padded = (len(data) + 7) & ~7
            if pos + 8 + padded > cs:
                raise InvalidArgumentError("Header extensions do not fit in a cluster")
            _EXT.pack_into(buf, pos, etype, len(data))
            buf[pos + 8:pos + 8 + len(data)] = data
            pos += 8 + padded
        pos += 8                                    # end marker (zeros)
        bfo = bfs = 0
        if self.backing_file:
            name = self.backing_file.encode("utf-8", "surrogateescape")
            if pos + len(name) > cs:
                raise InvalidArgumentError("Backing file name too long")
            buf[pos:pos + len(name)] = name
            bfo, bfs = pos, len(name)
        self.backing_file_offset, self.backing_file_size = bfo, bfs
        self.header_length = hlen
        _V2.pack_into(buf, 0, MAGIC, self.version, bfo, bfs, self.cluster_bits, self.size,
                      self.crypt_method, self.l1_size, self.l1_table_offset,
                      self.refcount_table_offset, self.refcount_table_clusters,
                      self.nb_snapshots, self.snapshots_offset)
        if self.version >= 3:
            _V3.pack_into(buf, _V2.size, self.incompatible_features,
                          self.compatible_features, self.autoclear_features,
                          self.refcount_order, hlen)
            buf[104] = self.compression_type
        return bytes(buf)
