"""The HTTP port ``serve`` opens: a small front that refuses, before Triton allocates anything,
an inference request declaring more values than it carries, then passes everything else through.

Triton 2.51's HTTP front end allocates an input's declared shape before it reads the JSON list
in ``"data"``: a request declaring ``[1, 1000000000, 48]`` with two numbers aborted the whole
server (``std::bad_alloc``, signal 6), and 2.51 has no option to cap it. A JSON number takes at
least one byte, so an input whose ``"data"`` is given may declare at most as many values as the
request has bytes; a body is read only up to :data:`MAX_BODY_BYTES`. Binary inputs are left to
Triton, which compares their declared size with the bytes sent before allocating (400,
``input byte size mismatch``). Such a request gets HTTP 400 with one ``{"error": ...}`` line,
as Triton's own refusals do, and the server never sees it.

Everything else is forwarded unchanged to Triton's HTTP port on loopback (headers, the control
secret included), responses streamed back (``generate_stream``'s server-sent events). gRPC goes
to Triton directly: its messages carry their data, bounded by gRPC's message size limit.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY_BYTES = 512 << 20  # an adapter's [32, 1024, 4096] float32 batch fits
INFER_PATH = re.compile(r"^/v2/models/[^/?]+(?:/versions/[^/?]+)?/infer/?$")
# hop-by-hop headers: about one connection, never forwarded
HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


def declared_too_much(body: bytes, inference_header_length: str | None) -> str | None:
    """Why this inference request must not reach Triton, or None."""
    try:
        head = body[: int(inference_header_length)] if inference_header_length else body
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError):
        return None  # not ours to judge: Triton refuses malformed JSON itself, allocating nothing
    inputs = request.get("inputs") if isinstance(request, dict) else None
    for item in inputs if isinstance(inputs, list) else []:
        if not isinstance(item, dict) or "data" not in item:
            continue
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            continue  # Triton refuses a malformed shape itself
        values = 1
        for d in shape:
            values *= max(d, 0)
        if values > len(body):
            return (
                f"input {str(item.get('name'))[:64]!r}: shape {shape[:8]} declares {values} values, the request "
                f"carries {len(body)} bytes"
            )
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 600  # an idle client connection is closed after this many seconds
    # a response's headers and body leave in one write, and no Nagle wait: with the default
    # unbuffered writes a small response waited on the client's delayed ACK (about 40 ms)
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    server: HttpGuard

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # Triton logs the requests; a front logging each would double the work

    def _refuse(self, status: int, message: str, close: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _forward(self) -> None:
        if self.headers.get("Transfer-Encoding"):
            return self._refuse(411, "a request body needs a Content-Length", close=True)
        length = self.headers.get("Content-Length", "0").strip() or "0"
        if not length.isdigit():
            return self._refuse(400, "Content-Length is not a number", close=True)
        if int(length) > MAX_BODY_BYTES:
            return self._refuse(
                413, f"request body of {length} bytes, over the {MAX_BODY_BYTES} this server reads", close=True
            )
        body = self.rfile.read(int(length)) if int(length) else b""
        if self.command == "POST" and INFER_PATH.match(self.path.split("?", 1)[0]):
            why = declared_too_much(body, self.headers.get("Inference-Header-Content-Length"))
            if why is not None:
                return self._refuse(400, why)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        conn = self.server.upstream()
        try:
            conn.request(
                self.command, self.path, body=body if body or self.command == "POST" else None, headers=headers
            )
            response = conn.getresponse()
        except (OSError, http.client.HTTPException):
            self.server.drop(conn)
            return self._refuse(502, "the inference server is not answering", close=True)
        try:
            self._relay(response)
        except OSError:  # the client went away: the upstream connection is in an unknown state
            self.server.drop(conn)
            self.close_connection = True
            return None
        if response.will_close:
            self.server.drop(conn)
        return None

    def _relay(self, response: http.client.HTTPResponse) -> None:
        self.send_response_only(response.status, response.reason)
        streamed = response.length is None  # chunked or until close: passed on as chunks
        for key, value in response.getheaders():
            if key.lower() not in HOP and not (streamed and key.lower() == "content-length"):
                self.send_header(key, value)
        if streamed and self.command != "HEAD":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while chunk := response.read1(1 << 16):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.end_headers()
            self.wfile.write(response.read())
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

    def finish(self) -> None:
        """The client's connection ends: so does this thread's connection to Triton (one per client
        connection, never left open: Triton's shutdown waits for open connections)."""
        try:
            super().finish()
        finally:
            conn = getattr(self.server._local, "conn", None)
            if conn is not None:
                self.server.drop(conn)


class _NoDelayConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class HttpGuard(ThreadingHTTPServer):
    """Listens on ``(host, port)``, forwards to Triton's HTTP on ``127.0.0.1:upstream_port``."""

    daemon_threads = True
    # socketserver's default backlog of 5 is less than the concurrent clients a served chain
    # meets (the tests alone open 16 at once); connections past it wait on SYN retries
    request_queue_size = 128

    def __init__(self, host: str, port: int, upstream_port: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self.upstream_port = upstream_port
        self._local = threading.local()
        self._open: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def upstream(self) -> http.client.HTTPConnection:
        """This thread's keep-alive connection to Triton."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _NoDelayConnection("127.0.0.1", self.upstream_port)
            self._local.conn = conn
            with self._lock:
                self._open.add(conn)
        return conn

    def drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        with self._lock:
            self._open.discard(conn)
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="prism-http-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and close the connections to Triton (open ones would hold its shutdown)."""
        if self._thread is not None:  # shutdown() waits for a serve_forever that must have started
            self.shutdown()
            self._thread = None
        self.server_close()
        with self._lock:
            for conn in list(self._open):
                with contextlib.suppress(OSError):
                    conn.close()
            self._open.clear()
