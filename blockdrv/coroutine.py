"""Driving ``async def`` driver hooks from synchronous code.

Every ``bdrv_co_*`` hook is a coroutine so that concurrent callers (an
asyncio application, the concurrency tests) can interleave requests on one
node.  The built-in protocols never suspend, so a synchronous caller simply
steps the coroutine once: no event loop, no thread, well under a microsecond.
A coroutine that does suspend needs an event loop; calling it through the
synchronous API is then a programming error, reported as such.
"""

from __future__ import annotations

import sys
from _thread import _local as _thread_local
from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any, Coroutine

# threading.local is this very class; importing threading for it costs a
# short command about a millisecond
_local = _thread_local()


def in_sync_context() -> bool:
    """True while :func:`run_sync` is driving a coroutine on this thread.

    A filter that may suspend (``asyncio.sleep(0)`` to let concurrent
    requests interleave) must not do so then: nothing would resume it.
    """
    return getattr(_local, "depth", 0) > 0


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion without an event loop and return its result."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    finally:
        _local.depth -= 1
    coro.close()
    raise RuntimeError("a blockdrv coroutine suspended under the synchronous API; "
                       "await the co_* method from an event loop instead")


class CoLock:
    """An ``asyncio.Lock`` that imports asyncio only when an event loop runs.

    Synchronous callers (:func:`run_sync`, i.e. the CLI and the public API)
    never contend -- one request runs to completion at a time on a thread --
    so for them the lock is a flag and asyncio (~20 ms of imports) is never
    loaded.  Under a running event loop the lock is a real ``asyncio.Lock``,
    created on first use, with its fairness and cancellation semantics.  A
    contended acquire without an event loop is the same programming error as
    any coroutine suspending under :func:`run_sync`.
    """

    __slots__ = ("_lock", "_held")

    def __init__(self) -> None:
        self._lock = None          # the asyncio.Lock, once a loop used us
        self._held = False         # held by a synchronous (loop-less) caller

    def locked(self) -> bool:
        return self._held or (self._lock is not None and self._lock.locked())

    async def __aenter__(self) -> None:
        lock = self._lock
        if lock is None:
            aio = sys.modules.get("asyncio")
            if aio is None or aio._get_running_loop() is None:
                if self._held:
                    raise RuntimeError("blockdrv lock contended outside an event loop")
                self._held = True
                return
            lock = self._lock = aio.Lock()
        if self._held:
            # A synchronous holder on another thread: never expected.
            raise RuntimeError("blockdrv lock held by a synchronous caller")
        await lock.acquire()

    async def __aexit__(self, *exc) -> None:
        if self._held:
            self._held = False
        else:
            self._lock.release()
