"""Figures a reliability run prints at the end (crash matrix tried/survived,
concurrency cases, fuzz examples): tests add to them with :func:`record` (or
the ``figures`` fixture of :mod:`blockdrv.testing.plugin`), the plugin prints
them in pytest's terminal summary under "reliability figures", one line per
``section: name`` and a ``TOTAL section`` line per section.
"""

from __future__ import annotations

from collections import defaultdict

# "section: name" -> {"tried": n, "survived": n, ...}
FIGURES: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))


def record(section: str, name: str, **counts: int) -> None:
    slot = FIGURES[f"{section}: {name}"]
    for key, value in counts.items():
        slot[key] += value


def summary_lines() -> list[str]:
    lines = []
    totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name in sorted(FIGURES):
        counts = FIGURES[name]
        lines.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        section = name.split(":", 1)[0]
        for key, value in counts.items():
            totals[section][key] += value
    for section, counts in sorted(totals.items()):
        lines.append(f"TOTAL {section}: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return lines


__all__ = ["FIGURES", "record", "summary_lines"]
