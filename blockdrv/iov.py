"""Scatter-gather I/O vectors over memoryviews (QEMU's ``QEMUIOVector``).

A request travels down the graph as one vector: format drivers slice it per
payload block and hand the slices to the protocol layer, which passes them to
``preadv``/``pwritev`` as they are.  Slicing never copies; only
:meth:`IOVector.to_bytes` and the bounce buffers of unaligned requests do.
"""

from __future__ import annotations

from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Iterable, Iterator


def _as_view(buf) -> memoryview:
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class IOVector:
    """An ordered list of byte buffers seen as one contiguous range."""

    __slots__ = ("iov", "size")

    def __init__(self, buffers: Iterable = ()) -> None:
        self.iov: list[memoryview] = []
        self.size = 0
        for buf in buffers:
            self.add(buf)

    @classmethod
    def from_buffer(cls, buf) -> "IOVector":
        """One-element vector over ``buf`` (bytes for writes, bytearray for reads)."""
        vec = cls()
        vec.add(buf)
        return vec

    @classmethod
    def allocate(cls, nbytes: int) -> "IOVector":
        return cls.from_buffer(bytearray(nbytes))

    def add(self, buf) -> None:
        view = _as_view(buf)
        if len(view):
            self.iov.append(view)
            self.size += len(view)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[memoryview]:
        return iter(self.iov)

    def slice(self, offset: int, nbytes: int) -> "IOVector":
        """A vector over ``[offset, offset + nbytes)`` sharing our buffers."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"iov slice {offset}+{nbytes} beyond {self.size}")
        if offset == 0 and nbytes == self.size:
            return self
        out = IOVector()
        end = offset + nbytes
        pos = 0
        for view in self.iov:
            vend = pos + len(view)
            if vend > offset and pos < end:
                lo = max(offset - pos, 0)
                hi = min(end, vend) - pos
                out.iov.append(view[lo:hi])
                out.size += hi - lo
            if vend >= end:
                break
            pos = vend
        return out

    def to_bytes(self) -> bytes:
        if len(self.iov) == 1:
            return self.iov[0].tobytes()
        return b"".join(self.iov)

    def gather(self, offset: int = 0, nbytes: int | None = None):
        """The range as one buffer; zero-copy when it lies in one element."""
        if nbytes is None:
            nbytes = self.size - offset
        part = self.slice(offset, nbytes)
        if len(part.iov) == 1:
            return part.iov[0]
        return part.to_bytes()

    def scatter(self, offset: int, data) -> None:
        """Copy ``data`` into the vector starting at ``offset``."""
        src = _as_view(data)
        pos = 0
        for view in self.slice(offset, len(src)).iov:
            n = len(view)
            view[:] = src[pos:pos + n]
            pos += n

    def memset(self, offset: int, nbytes: int, value: int = 0) -> None:
        if nbytes <= 0:
            return
        fill = bytes([value]) * min(nbytes, 1 << 20)
        for view in self.slice(offset, nbytes).iov:
            n = len(view)
            done = 0
            while done < n:
                step = min(n - done, len(fill))
                view[done:done + step] = fill[:step]
                done += step

    def is_zero(self, offset: int = 0, nbytes: int | None = None) -> bool:
        if nbytes is None:
            nbytes = self.size - offset
        return all(buffer_is_zero(v) for v in self.slice(offset, nbytes).iov)


_ZEROS = bytes(1 << 20)


def buffer_is_zero(buf) -> bool:
    """True when every byte of ``buf`` is zero.

    bytes == bytes is a memcmp; memoryview == memoryview is an element loop,
    so compare 1 MiB copies (about 35 us/MiB, cheaper than numpy for small
    buffers and on par for large ones).
    """
    view = _as_view(buf)
    step = len(_ZEROS)
    for pos in range(0, len(view), step):
        chunk = view[pos:pos + step].tobytes()
        if chunk != _ZEROS[:len(chunk)]:
            return False
    return True
