"""Command lines: argparse's parsers, built only when argparse is needed.

Every command declares its options on an :class:`ArgParser` exactly as on an
``argparse.ArgumentParser``.  Importing argparse costs a short command more
than blockdrv's own work: argparse imports ``re`` (with ``enum``,
``functools``, ``collections``) and ``gettext``, and asks gettext to
translate a few messages per parser (each a ``locale`` lookup) -- ~11 ms of
CPU here, twice qemu-img's whole ``info``.

So :meth:`ArgParser.parse_intermixed_args` first reads the command line
itself, for the plain forms every script uses: ``-x value``, ``-xvalue``,
clusters of flags (``-qU``), ``--name value``, ``--name=value``, flags and
operands in any order.  Whatever else it meets -- ``-h``/``--help``, an
unknown or abbreviated option, ``--``, a missing value, a value that starts
with ``-``, an option argparse would refuse -- it leaves to argparse,
which parses the whole line again with its own rules and messages.  So a
line parses to what argparse gives or is argparse's to judge;
``tests/unit/test_cli_argv.py`` compares the two over every command's
parser.  Anything else about a parser (``_actions``, ``format_help``,
``parse_args``) is argparse's, through :meth:`ArgParser.real`.
"""

from __future__ import annotations

from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse
    from typing import Any

# the add_argument forms the fast path reads; any other sends a parser to argparse
_OPTION_KEYS = frozenset(("dest", "action", "metavar", "help", "default"))
_OPERAND_KEYS = frozenset(("nargs", "metavar", "help"))
_ACTIONS = frozenset(("store", "store_true", "append"))


class Namespace:
    """The parsed options, as attributes (argparse.Namespace's behaviour)."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def __eq__(self, other: object) -> bool:
        return vars(self) == vars(other) if hasattr(other, "__dict__") else NotImplemented

    def __contains__(self, key: str) -> bool:
        return key in self.__dict__

    def __repr__(self) -> str:
        return "Namespace(%s)" % ", ".join(f"{k}={v!r}" for k, v in vars(self).items())


class ArgParser:
    """The options of command ``command``, declared as on argparse.  Its
    ``--help`` prints the command table's usage line, the command's summary,
    ``description`` and every option with its help string; its errors are
    qemu-img's getopt dialect (:mod:`.argparser`)."""

    def __init__(self, command: str, description: str = "", **kwargs: Any) -> None:
        from .commands import PROG
        self.command = command
        self.prog = f"{PROG} {command}"
        self.description = description
        self._kwargs = kwargs
        self._arguments: list[tuple[tuple, dict]] = []
        self._real: argparse.ArgumentParser | None = None

    def add_argument(self, *names: str, **kwargs: Any) -> None:
        self._arguments.append((names, kwargs))
        self._real = None

    def real(self) -> argparse.ArgumentParser:
        """The argparse parser of these declarations."""
        if self._real is None:
            from .argparser import build
            self._real = build(self.command, self.description, self._kwargs,
                               self._arguments)
        return self._real

    def __getattr__(self, name: str) -> Any:
        # _actions, format_help, print_help, parse_args...: argparse's own
        if name.startswith("__") or name in ("_real", "_arguments", "_kwargs"):
            raise AttributeError(name)
        return getattr(self.real(), name)

    def parse_intermixed_args(self, argv: list[str]) -> Any:
        fast = fast_parse(self._arguments, argv)
        return fast if fast is not None else self.real().parse_intermixed_args(argv)


def fast_parse(arguments: list[tuple[tuple, dict]], argv: list[str]) -> Namespace | None:
    """What ``parse_intermixed_args(argv)`` returns for these declarations,
    or None when the line is not one of the plain forms read here."""
    options: dict[str, tuple[str, str]] = {}        # option string -> (dest, action)
    values: dict[str, Any] = {}
    operand = None
    for names, kwargs in arguments:
        if names and names[0][:1] == "-":
            action = kwargs.get("action", "store")
            if action not in _ACTIONS or not _OPTION_KEYS.issuperset(kwargs):
                return None
            dest = kwargs.get("dest") or _dest(names)
            # argparse: the first declaration of a dest sets its default
            default = kwargs["default"] if "default" in kwargs else \
                (False if action == "store_true" else None)
            values.setdefault(dest, default)
            for name in names:
                options[name] = (dest, action)
        else:
            if (operand is not None or len(names) != 1 or kwargs.get("nargs") != "*"
                    or not _OPERAND_KEYS.issuperset(kwargs)):
                return None
            operand = names[0]
    operands: list[str] = []
    i, n = 0, len(argv)
    while i < n:
        token = argv[i]
        i += 1
        if token[:1] != "-" or token == "-":
            operands.append(token)
            continue
        if token == "--" or " " in token or (token[1] != "-" and "=" in token):
            return None
        items = _option_items(token, options)
        if items is None:
            return None
        for (dest, action), value in items:
            if action == "store_true":
                values[dest] = True
                continue
            if value is None:                       # the value is the next argument
                if i >= n or argv[i][:1] == "-":
                    return None
                value = argv[i]
                i += 1
            _store(values, dest, action, value)
    if operand is None:
        if operands:
            return None
    else:
        values[operand] = operands
    return Namespace(**values)


def _option_items(token: str, options: dict) -> list[tuple[tuple[str, str], str | None]] | None:
    """The options of one ``-...`` token with their attached values (None:
    none attached), or None when the token is not a plain form."""
    if token[1] == "-":                             # --name, --name=value
        name, eq, value = token.partition("=")
        spec = options.get(name)
        if spec is None or (eq and spec[1] == "store_true"):
            return None                             # unknown, abbreviated, --help, flag=x
        return [(spec, value if eq else None)]
    items = []                                      # -x, -xvalue, -qU, -qfvalue
    for j in range(1, len(token)):
        spec = options.get("-" + token[j])
        if spec is None:
            return None
        if spec[1] != "store_true":
            items.append((spec, token[j + 1:] or None))
            break
        items.append((spec, None))
    return items


def _dest(names: tuple) -> str:
    """argparse's dest: the first long option, else the first short one."""
    for name in names:
        if name.startswith("--"):
            return name[2:].replace("-", "_")
    return names[0][1:].replace("-", "_")


def _store(values: dict, dest: str, action: str, value: str) -> None:
    if action == "append":
        items = list(values.get(dest) or ())        # argparse copies, then appends
        items.append(value)
        values[dest] = items
    else:
        values[dest] = value
