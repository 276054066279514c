"""blkdebug's configuration: a dict, a JSON or INI rule file, or the filename."""

from __future__ import annotations

import os
from blockdrv._startup import dataclass, field
from typing import Any

from ...errors import InvalidArgumentError
from ...options import parse_bool
from .rules import Rule

_GLOBAL_KEYS = {"rules", "cache", "suspend", "record"}
_OWN_OPTIONS = {"driver", "config", "image"} | _GLOBAL_KEYS


@dataclass
class Config:
    rules: list[Rule] = field(default_factory=list)
    cache: str = "writethrough"
    suspend: bool = False
    record: bool = False


def parse_ini(text: str) -> dict[str, Any]:
    """The INI rule format (repeated sections allowed) as a config dict."""
    out: dict[str, Any] = {"rules": []}
    section: dict[str, Any] | None = None
    name = None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1].strip()
            if name == "blkdebug":
                section = out
            elif name in ("inject-error", "error", "crash"):
                section = {"action": "crash" if name == "crash" else "error"}
                out["rules"].append(section)
            else:
                raise InvalidArgumentError(f"blkdebug config line {lineno}: "
                                           f"unknown section [{name}]")
            continue
        key, eq, value = line.partition("=")
        if not eq or section is None:
            raise InvalidArgumentError(f"blkdebug config line {lineno}: expected key = value "
                                       "inside a section")
        section[key.strip().replace("-", "_")] = value.strip()
    return out


def load_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise InvalidArgumentError(f"blkdebug: cannot read config: {exc.strerror}",
                                   filename=path) from None
    if path.endswith(".json") or text.lstrip().startswith("{"):
        try:
            import json
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidArgumentError(f"blkdebug: invalid JSON config: {exc}",
                                       filename=path) from None
        if not isinstance(data, dict):
            raise InvalidArgumentError("blkdebug: JSON config must be an object", filename=path)
        return data
    return parse_ini(text)


def parse_config(config: dict[str, Any] | str | None) -> Config:
    """A :class:`Config` from a dict, a rule-file path, or None (no rules)."""
    if config is None or config == "":
        return Config()
    if isinstance(config, (str, os.PathLike)):
        config = load_config_file(os.fspath(config))
    unknown = set(config) - _GLOBAL_KEYS
    if unknown:
        raise InvalidArgumentError(f"blkdebug: unknown config key(s) {sorted(unknown)}")
    cfg = Config()
    for raw in config.get("rules", ()):
        cfg.rules.append(Rule.from_dict(dict(raw)))
    cfg.cache = str(config.get("cache", "writethrough"))
    if cfg.cache not in ("writethrough", "volatile"):
        raise InvalidArgumentError("blkdebug: cache must be 'writethrough' or 'volatile'")
    cfg.suspend = parse_bool(config.get("suspend", False), "suspend")
    cfg.record = parse_bool(config.get("record", False), "record")
    return cfg


def split_filename(filename: str) -> tuple[str, str]:
    """``blkdebug:CONFIG:PATH`` -> (CONFIG, PATH)."""
    rest = filename[len("blkdebug:"):] if filename.startswith("blkdebug:") else filename
    cfg, sep, path = rest.partition(":")
    if not sep or not path:
        raise InvalidArgumentError("blkdebug: filename must be blkdebug:[CONFIG]:PATH",
                                   filename=filename)
    return cfg, path
