"""A fault-injecting HTTP proxy for an S3 API server on 127.0.0.1 (the tests put it in front of moto).

It forwards every request, except that it answers a seeded share of them `503 SlowDown` (S3's
throttling), answers everything `503 ServiceUnavailable` while an outage lasts, and answers
`403 AccessDenied` for the buckets it is told to deny.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Connection-level headers are the proxy's own business, not the upstream's.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


def s3_error(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>faultproxy</RequestId></Error>"
    ).encode()


FAULTS = {
    "slowdown": (503, s3_error("SlowDown", "Please reduce your request rate.")),
    "outage": (503, s3_error("ServiceUnavailable", "Service is unable to handle request.")),
    "denied": (403, s3_error("AccessDenied", "Access Denied")),
}


class FaultPolicy:
    """Which fault, if any, a request gets. Thread-safe; counts every decision."""

    def __init__(self, fail_share: float = 0.0, seed: int = 0) -> None:
        self.fail_share = fail_share
        self.random = random.Random(seed)
        self.denied_buckets: set[str] = set()
        self.denied_paths: set[str] = set()  # objects refused one by one, as "/bucket/key"
        self.outage_until = 0.0
        self.outage_trigger: tuple[str, int, float] | None = None
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def start_outage(self, seconds: float) -> None:
        with self.lock:
            self.outage_until = time.monotonic() + seconds

    def outage_after(self, prefix: str, reads: int, seconds: float) -> None:
        """Start an outage of `seconds` at the `reads`-th GET of a path under `prefix` (a job mid-read)."""
        with self.lock:
            self.outage_trigger = (prefix, reads, seconds)

    def in_outage(self) -> bool:
        return time.monotonic() < self.outage_until

    def decide(self, method: str, path: str) -> str | None:
        bucket = path.lstrip("/").split("/", 1)[0].split("?", 1)[0]
        with self.lock:
            if self.outage_trigger and method == "GET" and path.startswith(self.outage_trigger[0]):
                prefix, reads, seconds = self.outage_trigger
                self.outage_trigger = (prefix, reads - 1, seconds) if reads > 1 else None
                if reads == 1:
                    self.outage_until = time.monotonic() + seconds
            if self.in_outage():
                fault = "outage"
            elif bucket in self.denied_buckets or path.split("?", 1)[0] in self.denied_paths:
                fault = "denied"
            elif self.random.random() < self.fail_share:
                fault = "slowdown"
            else:
                fault = None
            self.counts[fault or "forwarded"] += 1
        return fault


class FaultProxy:
    """The proxy, serving on 127.0.0.1 in a thread: `url` is its endpoint, `policy` its faults."""

    def __init__(self, upstream: str, fail_share: float = 0.0, seed: int = 0) -> None:
        target = urlsplit(upstream)
        self.policy = FaultPolicy(fail_share, seed)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(target.hostname, target.port, self.policy))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(host: str, port: int, policy: FaultPolicy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, *_args: object) -> None:
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in HOP_HEADERS and name.lower() != "content-length":
                    self.send_header(name, value)
            length = dict((k.lower(), v) for k, v in headers).get("content-length", str(len(body)))
            self.send_header("Content-Length", length if self.command == "HEAD" else str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _forward(self) -> None:
            body = self._body()
            fault = policy.decide(self.command, self.path)
            if fault is not None:
                status, error = FAULTS[fault]
                self._answer(status, [("Content-Type", "application/xml")], error)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            upstream = http.client.HTTPConnection(host, port, timeout=60)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                self._answer(response.status, response.getheaders(), response.read())
            finally:
                upstream.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler
