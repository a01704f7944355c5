"""A fault-injecting HTTP endpoint in front of moto, for tests of storage outages.

Every request is forwarded to moto unchanged, and logged (method, path with query), so a test
can count LIST requests. While `fail` is set (a predicate over method and path), matching
requests are answered ``503 ServiceUnavailable`` instead, as S3 does under an outage: the
clients' own retry settings then decide what happens. moto does not check request signatures,
so forwarding the signed requests as they are works.
"""
from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

UNAVAILABLE = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
               b"<Message>injected outage</Message></Error>")
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.fail: Callable[[str, str], bool] | None = None
        self.log: list[tuple[str, str]] = []
        self.failed = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def lists(self, prefix: str) -> int:
        """How many ListObjects requests listed the folder `prefix` (bucket-relative, e.g. "in")."""
        with self._lock:
            queries = [parse_qs(urlsplit(p).query) for m, p in self.log if m == "GET"]
        return sum(1 for q in queries if "list-type" in q and q.get("prefix", [""])[0].rstrip("/") == prefix)

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy._lock:
                    proxy.log.append((self.command, self.path))
                    failing = proxy.fail is not None and proxy.fail(self.command, self.path)
                    proxy.failed += failing
                if failing:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(UNAVAILABLE)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(UNAVAILABLE)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                    if body is not None:
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_HEADERS:
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else
                                                           resp.getheader("Content-Length") or 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        return Handler
