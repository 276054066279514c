"""``-p``: qemu-img's "    (xx.xx/100%)" progress line, drawn by tqdm on stderr."""

from __future__ import annotations

import sys


class Progress:
    """Progress over ``total`` units; a no-op unless ``enabled``."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=max(total, 1), file=sys.stderr, leave=True,
                            bar_format="    ({percentage:.2f}/100%)",
                            mininterval=0.1, dynamic_ncols=False)
            if total == 0:
                self.bar.update(1)

    def update(self, n: int) -> None:
        if self.bar is not None and n:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
