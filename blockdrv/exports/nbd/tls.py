"""TLS credentials as QEMU names them: ``--object tls-creds-x509,id=ID,dir=DIR,
endpoint=server[,verify-peer=on|off]``, turned into a Python ``ssl`` context.

``DIR`` holds QEMU's file names: ``ca-cert.pem``, ``server-cert.pem`` and
``server-key.pem``.  With ``verify-peer`` on (QEMU's default) clients must
present a certificate signed by ``ca-cert.pem``.
"""

from __future__ import annotations

import os
import ssl


class TLSConfigError(Exception):
    """Bad ``--object``/``--tls-creds`` arguments; the message is for the user."""


_BOOL = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def parse_object(text: str) -> dict[str, str]:
    """``type,key=value,...`` as QEMU's option syntax (``,,`` is a literal
    comma) into a dict with ``qom-type`` for the leading bare word."""
    fields, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "," and text[i + 1:i + 2] == ",":
            cur.append(",")
            i += 2
            continue
        if ch == ",":
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    fields.append("".join(cur))
    out: dict[str, str] = {}
    for n, field in enumerate(fields):
        key, sep, value = field.partition("=")
        if not sep:
            if n == 0:
                out["qom-type"] = key
                continue
            raise TLSConfigError(f"Invalid parameter '{field}' in --object")
        out[key] = value
    return out


class X509Creds:
    """One ``tls-creds-x509`` object."""

    def __init__(self, props: dict[str, str]) -> None:
        if props.get("qom-type") != "tls-creds-x509":
            raise TLSConfigError(f"--object type '{props.get('qom-type')}' is not supported "
                                 "(blockdrv nbd knows only tls-creds-x509)")
        unknown = set(props) - {"qom-type", "id", "dir", "endpoint", "verify-peer"}
        if unknown:
            raise TLSConfigError(f"tls-creds-x509: property '{sorted(unknown)[0]}' is not "
                                 "supported")
        self.id = props.get("id") or ""
        if not self.id:
            raise TLSConfigError("Parameter 'id' is missing")
        self.dir = props.get("dir") or ""
        if not self.dir:
            raise TLSConfigError(f"tls-creds-x509 '{self.id}': 'dir' is required")
        self.endpoint = props.get("endpoint", "client")
        if self.endpoint not in ("server", "client"):
            raise TLSConfigError(f"tls-creds-x509 '{self.id}': invalid endpoint "
                                 f"'{self.endpoint}'")
        vp = props.get("verify-peer", "on").lower()
        if vp not in _BOOL:
            raise TLSConfigError(f"tls-creds-x509 '{self.id}': verify-peer must be on or off")
        self.verify_peer = _BOOL[vp]

    def server_context(self) -> ssl.SSLContext:
        if self.endpoint != "server":
            raise TLSConfigError("Expecting TLS credentials with a server endpoint")
        path = lambda name: os.path.join(self.dir, name)        # noqa: E731
        for name in ("server-cert.pem", "server-key.pem") + (
                ("ca-cert.pem",) if self.verify_peer else ()):
            if not os.path.isfile(path(name)):
                raise TLSConfigError(f"Unable to access credentials {path(name)}: "
                                     "No such file or directory")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(path("server-cert.pem"), path("server-key.pem"))
            if self.verify_peer:
                ctx.load_verify_locations(path("ca-cert.pem"))
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (ssl.SSLError, OSError) as exc:
            raise TLSConfigError(f"Cannot load TLS credentials from {self.dir}: {exc}") \
                from None
        return ctx
