"""One blkdebug rule: parsed from its dict/INI form, matched against events."""

from __future__ import annotations

import errno as _errno
from blockdrv._startup import dataclass
from typing import Any

from ...errors import InvalidArgumentError
from ...options import parse_bool

EVENTS = ("read", "write", "flush", "truncate", "discard")
ACTIONS = ("error", "crash")
_RULE_KEYS = {"event", "nth", "offset", "length", "action", "once", "errno", "after_crash",
              "unflushed", "seed", "keep_probability"}


def _parse_errno(value: Any) -> int:
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    code = getattr(_errno, text.upper(), None)
    if not isinstance(code, int):
        raise InvalidArgumentError(f"blkdebug: unknown errno '{value}'")
    return code


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.replace("|", ",").split(",") if v.strip()]
    return [str(v) for v in value]


@dataclass
class Rule:
    events: frozenset[str]
    action: str
    nth: int | None = None
    offset: int | None = None
    length: int | None = None
    once: bool = False
    errno: int = _errno.EIO
    after_crash: str = "drop"
    unflushed: str = "keep"
    seed: int = 0
    keep_probability: float = 0.5
    seen: int = 0                 # matching events so far
    fired: int = 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any], default_action: str | None = None) -> "Rule":
        unknown = set(raw) - _RULE_KEYS
        if unknown:
            raise InvalidArgumentError(f"blkdebug: unknown rule key(s) {sorted(unknown)}")
        action = str(raw.get("action", default_action or "")).replace("inject-", "")
        if action not in ACTIONS:
            raise InvalidArgumentError(f"blkdebug: rule action must be one of {ACTIONS}")
        events = frozenset(_as_list(raw.get("event", "write")))
        if not events or not events <= set(EVENTS):
            raise InvalidArgumentError(f"blkdebug: rule events must be among {EVENTS}")
        rule = cls(events, action)
        try:
            if raw.get("nth") is not None:
                rule.nth = int(raw["nth"])
                if rule.nth < 1:
                    raise ValueError
            if raw.get("offset") is not None or raw.get("length") is not None:
                rule.offset = int(raw.get("offset", 0))
                rule.length = int(raw.get("length", 1 << 62))
            rule.once = parse_bool(raw.get("once", False), "once")
            rule.errno = _parse_errno(raw.get("errno", _errno.EIO))
            rule.after_crash = str(raw.get("after_crash", "drop"))
            rule.unflushed = str(raw.get("unflushed", "keep"))
            rule.seed = int(raw.get("seed", 0))
            rule.keep_probability = float(raw.get("keep_probability", 0.5))
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"blkdebug: invalid rule {raw!r}") from None
        if rule.after_crash not in ("drop", "fail"):
            raise InvalidArgumentError("blkdebug: after_crash must be 'drop' or 'fail'")
        if rule.unflushed not in ("keep", "lose", "random"):
            raise InvalidArgumentError("blkdebug: unflushed must be 'keep', 'lose' or 'random'")
        return rule

    def matches(self, kind: str, offset: int | None, nbytes: int | None) -> bool:
        if kind not in self.events:
            return False
        if self.offset is not None:
            if offset is None or nbytes is None:
                return False
            if not (offset < self.offset + self.length and offset + max(nbytes, 1) > self.offset):
                return False
        return True

