"""A loopback HTTP server for the fsspec protocol's tests: serves the files of
one directory with ``Range: bytes=A-B`` honoured (206 + Content-Range; the
standard library's SimpleHTTPRequestHandler ignores Range), HEAD with
Content-Length, and counts requests so tests can see the read-ahead work.
``ranges=False`` makes a server that ignores Range, as a plain one does."""

from __future__ import annotations

import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class RangeServer:
    def __init__(self, root: str, ranges: bool = True) -> None:
        self.root = root
        self.ranges = ranges
        self.requests: list[tuple[str, str, str | None]] = []   # (method, path, Range)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:      # quiet
                pass

            def _file(self):
                name = self.path.split("?", 1)[0].lstrip("/")
                path = os.path.realpath(os.path.join(server.root, name))
                if not path.startswith(os.path.realpath(server.root) + os.sep) \
                        or not os.path.isfile(path):
                    return None
                return path

            def _reply(self, send_body: bool) -> None:
                server.requests.append((self.command, self.path, self.headers.get("Range")))
                path = self._file()
                if path is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = os.path.getsize(path)
                start, end, status = 0, size - 1, 200
                rng = self.headers.get("Range") if server.ranges else None
                if rng:
                    m = _RANGE.match(rng.strip())
                    if not m or (not m.group(1) and not m.group(2)):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    if m.group(1):
                        start = int(m.group(1))
                        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                    else:                       # suffix: the last N bytes
                        start = max(0, size - int(m.group(2)))
                    if start >= size or start > end:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "bytes" if server.ranges else "none")
                self.send_header("Content-Length", str(end - start + 1))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                if not send_body:
                    return
                with open(path, "rb") as f:
                    f.seek(start)
                    left = end - start + 1
                    while left:
                        chunk = f.read(min(left, 1 << 20))
                        if not chunk:
                            break
                        try:
                            self.wfile.write(chunk)
                        except (BrokenPipeError, ConnectionResetError):
                            return
                        left -= len(chunk)

            def do_GET(self) -> None:
                self._reply(True)

            def do_HEAD(self) -> None:
                self._reply(False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
