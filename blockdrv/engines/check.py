"""qemu-img check's engine (img_check): check, repair, and check again.

After a repair qemu-img checks the image a second time and reports that
pass's counters, with the first pass's "fixed" counts: what was repaired,
and whether anything is left.  The double check is part of the engine so
that the CLI and Python callers get the same answer.
"""

from __future__ import annotations

import errno as _errno
import os
from blockdrv._startup import NamedTuple

from .._startup import replace
from ..common import FIX_ERRORS, FIX_LEAKS, O_CHECK, O_FORCE_SHARE, O_RDWR, CheckResult
from ..errors import BlockDriverError, InvalidArgumentError, UnsupportedError
from ..node import BlockDriverState
from .common import open_source, reword, why

REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}


def repair_flags(repair: str | None) -> int:
    """qemu-img check's ``-r``: None, "leaks" or "all" as FIX_* flags."""
    try:
        return REPAIR_MODES[repair]
    except KeyError:
        raise InvalidArgumentError("Unknown option value for -r (expecting 'leaks' or "
                                   f"'all'): {repair}") from None


class CheckReport(NamedTuple):
    """Both passes: ``first`` (with the repair), ``second`` (the double check
    after a repair; None when nothing was repaired)."""

    first: CheckResult
    second: CheckResult | None

    @property
    def result(self) -> CheckResult:
        """The answer as qemu-img check reports it: the last pass's counters
        with the repair's fixed counts; messages of both passes, each once."""
        if self.second is None:
            return self.first
        said = set(self.first.messages)
        return replace(
            self.second, corruptions_fixed=self.first.corruptions_fixed,
            leaks_fixed=self.first.leaks_fixed,
            messages=self.first.messages + [m for m in self.second.messages
                                            if m not in said])


def _one_pass(bs: BlockDriverState, fix: int) -> CheckResult:
    try:
        return bs.check(fix)
    except BlockDriverError as exc:
        if exc.errno == _errno.ENOTSUP:
            raise UnsupportedError("This image format does not support checks",
                                   errno=_errno.ENOTSUP) from None
        failed = reword(exc, f"Check failed: {why(exc)}")
        failed.result = getattr(exc, "result", None)     # the lines said so far
        raise failed from None


def img_check(bs: BlockDriverState, fix: int = 0) -> CheckReport:
    """Check an open image (opened with O_CHECK, and O_RDWR to repair)."""
    first = _one_pass(bs, fix)
    if not (first.corruptions_fixed or first.leaks_fixed):
        return CheckReport(first, None)
    return CheckReport(first, _one_pass(bs, 0))


def check(path, *, fmt: str | None = None, repair: str | None = None,
          force_share: bool = False) -> CheckResult:
    """Open ``path`` and check it; see :func:`blockdrv.check`."""
    fix = repair_flags(repair)
    flags = O_CHECK | (O_RDWR if fix else 0) | (O_FORCE_SHARE if force_share else 0)
    bs = open_source(os.fspath(path), fmt, flags)
    try:
        return img_check(bs, fix).result
    finally:
        bs.close()
