"""Finding the oracle tools.

Interop tests need qemu-img and friends.  On a developer's machine without
them the tests skip; under ``CI=true`` a missing oracle is a failure, so a
broken install step can never turn the interop suite silently green.
"""

from __future__ import annotations

import os
import shutil


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of ``name``; pytest skip (or fail under CI) when it is missing."""
    import pytest

    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install qemu-utils libvhdi-utils)"
        if in_ci():
            pytest.fail(f"CI=true but the oracle is missing: {message}")
        pytest.skip(message)
    return path
