"""Driving ``async def`` driver hooks from synchronous code.

Every ``bdrv_co_*`` hook is a coroutine so that concurrent callers (an
asyncio application, the concurrency tests) can interleave requests on one
node.  The built-in protocols never suspend, so a synchronous caller simply
steps the coroutine once: no event loop, no thread, well under a microsecond.
A coroutine that does suspend needs an event loop; calling it through the
synchronous API is then a programming error, reported as such.
"""

from __future__ import annotations

import threading
from typing import Any, Coroutine

_local = threading.local()


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
