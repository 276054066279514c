"""``-p``: qemu-img's "    (xx.xx/100%)" progress line, drawn by tqdm on stderr."""

from __future__ import annotations

import sys

_STEPS = 10000          # the line shows hundredths of a percent


class Progress:
    """An engine's ``progress(done_fraction)`` callback drawn as qemu-img's
    line; a no-op unless ``enabled``.  The line appears at the first call,
    once the engine has opened its images (not before a failed open)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def update(self, fraction: float) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=_STEPS, file=sys.stderr, leave=True,
                            bar_format="    ({percentage:.2f}/100%)",
                            mininterval=0.1, dynamic_ncols=False)
        # whole steps, so that 1.0 shows as 100.00 whatever the float sums
        step = min(int(fraction * _STEPS), _STEPS)
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
