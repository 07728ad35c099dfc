"""A fault-injecting HTTP proxy between the product and the moto S3 server (tests only).

Each request is read whole, then, by a seeded draw (or every Nth request: `FaultRates.every`),
answered with 503 SlowDown, answered with 500 InternalError, cut off by a TCP reset, delayed,
or passed on. A HEAD's error answer has no body, as S3 sends it. Faults strike before the
request reaches S3, as throttling and a flaky network do; what passes is forwarded verbatim
(the Host header too, so signatures still match) and its answer is sent back whole.
`down()` closes the port: every later connection is refused, as when S3 is gone for good.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass(frozen=True)
class FaultRates:
    slow_down: float = 0.08  # 503 SlowDown
    internal: float = 0.04  # 500 InternalError
    reset: float = 0.04  # TCP reset before any answer
    delay: float = 0.10  # answered late
    max_delay_s: float = 0.3
    every: int = 0  # > 0: no random draw; every `every`-th request is 503 SlowDown instead


EVERY_TENTH = FaultRates(0, 0, 0, 0, every=10)  # throttling as a busy cluster meets it


ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
    "<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
)


class FaultProxy:
    def __init__(self, upstream: str, rates: FaultRates, seed: int = 0, port: int = 0) -> None:
        self.upstream = urlparse(upstream)
        self.rates = rates
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.served = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size)
                        self.rfile.readline()
                        if size == 0:
                            break
                        chunks.append(chunk)
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                fault = proxy.draw()
                if fault == "reset":
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault in ("slow_down", "internal"):
                    code, status, message = {
                        "slow_down": ("SlowDown", 503, "Please reduce your request rate."),
                        "internal": ("InternalError", 500, "We encountered an internal error."),
                    }[fault]
                    data = ERROR_BODY.format(code=code, message=message).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return
                if fault == "delay":
                    time.sleep(proxy.random_delay())
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                up = proxy.upstream
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                length = resp.getheader("Content-Length")
                self.send_header(
                    "Content-Length", length if self.command == "HEAD" else str(len(data))
                )
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def draw(self) -> str:
        r = self.rates
        with self.lock:
            if r.every:  # the deterministic pattern: every Nth request is throttled
                self.served += 1
                fault = "slow_down" if self.served % r.every == 0 else "pass"
                self.counts[fault] += 1
                return fault
            u = self.random.random()
            fault = "pass"
            for name in ("slow_down", "internal", "reset", "delay"):
                rate = getattr(r, name)
                if u < rate:
                    fault = name
                    break
                u -= rate
            self.counts[fault] += 1
        return fault

    def random_delay(self) -> float:
        with self.lock:
            return self.random.uniform(0.0, self.rates.max_delay_s)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def down(self) -> None:
        """S3 gone for good: stop serving and close the port (connections are refused)."""
        self.server.shutdown()
        self.server.server_close()
