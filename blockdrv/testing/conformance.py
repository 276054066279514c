"""A conformance suite every protocol driver must pass (fsspec style).

Subclass :class:`ProtocolConformance` in your test module and say how to make
a fresh image of your protocol; pytest collects the inherited tests::

    from blockdrv.testing.conformance import ProtocolConformance

    class TestMyProtocol(ProtocolConformance):
        protocol = "myproto"

        def new_filename(self, tmp_path, name):
            return f"myproto:{tmp_path.name}-{name}"

``new_filename`` returns a filename for which
``open_protocol(filename, O_RDWR, {"create": True})`` creates an empty
image.  Override ``supports_truncate`` / ``discard_zeroes`` for drivers
that lack those capabilities.  The tests run through the generic layer
(:class:`blockdrv.node.BlockDriverState`), so they also pin down what the
layer guarantees on top of a driver.
"""

from __future__ import annotations

import errno

import pytest

from ..block import open_protocol
from ..errors import BlockDriverError, ReadOnlyError
from ..iov import IOVector
from ..common import BLOCK_DATA, BLOCK_ZERO, O_RDWR, O_UNMAP, WRITE_UNMAP


class ProtocolConformance:
    """Inherit and define :meth:`new_filename` (and ``protocol``)."""

    protocol: str = ""
    supports_truncate = True
    discard_zeroes = False          # True when discarded ranges read as zeros

    # -- to override ------------------------------------------------------------

    def new_filename(self, tmp_path, name: str) -> str:  # pragma: no cover
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------

    @pytest.fixture
    def make(self, tmp_path):
        """``make(size=..., data=None, readonly=False)`` -> an open protocol node."""
        nodes = []
        counter = [0]

        def factory(size: int = 1 << 20, data: bytes | None = None,
                    readonly: bool = False):
            counter[0] += 1
            name = self.new_filename(tmp_path, f"img{counter[0]}")
            bs = open_protocol(name, O_RDWR, {"create": True})
            try:
                if data is not None:
                    bs.growable = True
                    bs.pwrite(0, data)
                    bs.growable = False
                if size is not None and bs.total_size != size:
                    bs.truncate(size)
                bs.flush()
            finally:
                bs.close()
            # discard=unmap: the suite checks what a discard does when it is
            # passed down (without O_UNMAP the generic layer drops it).
            node = open_protocol(name, 0 if readonly else O_RDWR | O_UNMAP, {})
            nodes.append(node)
            return node

        yield factory
        for node in nodes:
            node.close()

    # -- the suite --------------------------------------------------------------------

    def test_size_after_open(self, make):
        bs = make(size=3 * 4096)
        assert bs.getlength() == 3 * 4096
        assert bs.total_size == 3 * 4096

    def test_fresh_image_reads_zero(self, make):
        bs = make(size=64 * 1024)
        assert bytes(bs.pread(0, 64 * 1024)) == bytes(64 * 1024)

    def test_write_read_roundtrip(self, make):
        bs = make(size=1 << 20)
        payload = bytes(range(256)) * 40
        bs.pwrite(4096, payload)
        assert bytes(bs.pread(4096, len(payload))) == payload
        assert bytes(bs.pread(0, 4096)) == bytes(4096)

    @pytest.mark.parametrize("offset,length", [(1, 1), (511, 2), (1000, 5000), (4095, 4097)])
    def test_unaligned_io(self, make, offset, length):
        bs = make(size=64 * 1024)
        bs.pwrite(0, b"\xaa" * 16384)
        bs.pwrite(offset, b"\x55" * length)
        expect = bytearray(b"\xaa" * 16384)
        expect[offset:offset + length] = b"\x55" * length
        assert bytes(bs.pread(0, 16384)) == bytes(expect)

    def test_vectored_io(self, make):
        bs = make(size=1 << 20)
        parts = [b"a" * 100, b"b" * 412, b"c" * 3584]
        bs.pwritev(8192, IOVector(parts))
        out = [bytearray(7), bytearray(4089)]
        bs.preadv(8192, IOVector(out))
        assert bytes(out[0] + out[1]) == b"".join(parts)

    def test_zero_length_requests(self, make):
        bs = make(size=4096)
        assert bytes(bs.pread(4096, 0)) == b""
        bs.pwrite(4096, b"")
        bs.pwrite_zeroes(0, 0)
        bs.pdiscard(0, 0)
        assert bs.total_size == 4096

    def test_read_beyond_end_fails(self, make):
        bs = make(size=4096)
        with pytest.raises(BlockDriverError) as info:
            bs.pread(4000, 200)
        assert info.value.errno == errno.EIO
        with pytest.raises(BlockDriverError):
            bs.pread(8192, 0)
        with pytest.raises(BlockDriverError):
            bs.pread(-1, 1)

    def test_write_beyond_end_fails(self, make):
        bs = make(size=4096)
        with pytest.raises(BlockDriverError):
            bs.pwrite(4095, b"xx")
        assert bs.total_size == 4096

    def test_growable_node_extends(self, make):
        bs = make(size=4096)
        bs.growable = True
        bs.pwrite(8192, b"tail")
        assert bs.total_size == 8196
        assert bytes(bs.pread(4096, 4100)) == bytes(4096) + b"tail"
        # reading past the end of a growable node yields zeros
        assert bytes(bs.pread(8192, 16)) == b"tail" + bytes(12)

    def test_write_zeroes(self, make):
        bs = make(size=1 << 20)
        bs.pwrite(0, b"\xff" * 65536)
        bs.pwrite_zeroes(4096, 8192)
        bs.pwrite_zeroes(100, 10)
        bs.pwrite_zeroes(16384, 4096, WRITE_UNMAP)
        expect = bytearray(b"\xff" * 65536)
        expect[4096:12288] = bytes(8192)
        expect[100:110] = bytes(10)
        expect[16384:20480] = bytes(4096)
        assert bytes(bs.pread(0, 65536)) == bytes(expect)

    def test_discard_keeps_other_bytes(self, make):
        bs = make(size=1 << 20)
        bs.pwrite(0, b"\x11" * 65536)
        bs.pdiscard(4096, 8192)
        data = bytes(bs.pread(0, 65536))
        assert data[:4096] == b"\x11" * 4096
        assert data[12288:] == b"\x11" * (65536 - 12288)
        if self.discard_zeroes:
            assert data[4096:12288] == bytes(8192)

    def test_readonly_refuses_writes(self, make):
        bs = make(size=4096, readonly=True)
        assert bs.read_only
        for op in (lambda: bs.pwrite(0, b"x"), lambda: bs.pwrite_zeroes(0, 512),
                   lambda: bs.pdiscard(0, 512), lambda: bs.truncate(8192)):
            with pytest.raises(ReadOnlyError):
                op()
        assert bytes(bs.pread(0, 16)) == bytes(16)

    def test_truncate_grow_and_shrink(self, make):
        if not self.supports_truncate:
            # a protocol that cannot resize says so with a block error
            bs = make(size=4096)
            with pytest.raises(BlockDriverError):
                bs.truncate(16384)
            assert bs.total_size == 4096
            return
        bs = make(size=4096)
        bs.pwrite(0, b"\x77" * 4096)
        bs.truncate(16384)
        assert bs.total_size == 16384
        assert bytes(bs.pread(4096, 12288)) == bytes(12288)
        bs.truncate(1024)
        assert bs.total_size == 1024
        bs.truncate(4096)
        assert bytes(bs.pread(0, 4096)) == b"\x77" * 1024 + bytes(3072)

    def test_block_status_is_consistent(self, make):
        bs = make(size=1 << 20)
        bs.pwrite(65536, b"\x01" * 65536)
        pos = 0
        while pos < bs.total_size:
            st = bs.block_status(pos, bs.total_size - pos)
            assert 0 < st.pnum <= bs.total_size - pos
            assert st.flags & (BLOCK_DATA | BLOCK_ZERO)
            if st.flags & BLOCK_ZERO:
                probe = min(st.pnum, 65536)
                assert bytes(bs.pread(pos, probe)) == bytes(probe)
            pos += st.pnum
        st = bs.block_status(65536, 4096)
        assert st.flags & BLOCK_DATA

    def test_flush_and_reopen_persist(self, make, tmp_path):
        bs = make(size=8192)
        bs.pwrite(0, b"persist")
        bs.flush()
        name = bs.filename
        bs.close()
        again = open_protocol(name, 0, {})
        try:
            assert bytes(again.pread(0, 7)) == b"persist"
        finally:
            again.close()

    def test_close_is_idempotent(self, make):
        bs = make(size=4096)
        bs.close()
        bs.close()
        with pytest.raises(BlockDriverError):
            bs.pread(0, 1)

    def test_reopen_read_write_transaction(self, make):
        bs = make(size=4096, readonly=True)
        bs.reopen(read_only=False)
        assert not bs.read_only
        bs.pwrite(0, b"rw")
        bs.reopen(read_only=True)
        assert bs.read_only
        with pytest.raises(ReadOnlyError):
            bs.pwrite(0, b"ro")
        assert bytes(bs.pread(0, 2)) == b"rw"


__all__ = ["ProtocolConformance"]
