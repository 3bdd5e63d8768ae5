"""A fault-injecting HTTP proxy in front of moto, for the controller's SQS calls.

moto never throttles, never fails and accepts stale receipt handles, so the failure paths of
the controller are driven through this proxy: the test points the controller's
AWS_ENDPOINT_URL at it and arms faults per SQS operation."""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlsplit

FaultKind = Literal["throttle", "server_error", "timeout", "invalid_handle", "refuse"]


@dataclass
class Fault:
    operation: str  # e.g. "ReceiveMessage", or "*" for every operation
    kind: FaultKind
    remaining: int  # how many more requests it hits; -1 = until cleared


@dataclass
class FaultProxy:
    upstream: str
    faults: list[Fault] = field(default_factory=list)
    hits: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def arm(self, operation: str, kind: FaultKind, times: int = -1) -> None:
        with self._lock:
            self.faults.append(Fault(operation, kind, times))

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def _take(self, operation: str) -> FaultKind | None:
        with self._lock:
            self.calls[operation] = self.calls.get(operation, 0) + 1
            for fault in self.faults:
                if fault.operation in (operation, "*") and fault.remaining != 0:
                    if fault.remaining > 0:
                        fault.remaining -= 1
                    key = f"{operation}:{fault.kind}"
                    self.hits[key] = self.hits.get(key, 0) + 1
                    return fault.kind
        return None

    def start(self) -> FaultProxy:
        proxy = self
        upstream = urlsplit(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                target = self.headers.get("X-Amz-Target", "")
                operation = target.rsplit(".", 1)[-1] if target else "unknown"
                fault = proxy._take(operation)
                if fault == "refuse":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "timeout":
                    time.sleep(15)
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "throttle":
                    return self._error(400, "ThrottlingException", "Rate exceeded")
                if fault == "server_error":
                    return self._error(500, "InternalError", "injected server error")
                if fault == "invalid_handle":
                    if operation.endswith("Batch"):
                        entries = json.loads(body or b"{}").get("Entries", [])
                        failed = [
                            {
                                "Id": e["Id"],
                                "SenderFault": True,
                                "Code": "ReceiptHandleIsInvalid",
                                "Message": "The input receipt handle is invalid.",
                            }
                            for e in entries
                        ]
                        return self._json(200, {"Successful": [], "Failed": failed})
                    return self._error(
                        400, "ReceiptHandleIsInvalid", "The input receipt handle is invalid."
                    )
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                connection = http.client.HTTPConnection(
                    upstream.hostname, upstream.port, timeout=60
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = upstream.netloc
                connection.request("POST", self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                connection.close()

            def _error(self, status: int, code: str, message: str) -> None:
                self._json(
                    status,
                    {"__type": f"com.amazonaws.sqs#{code}", "message": message},
                    extra={"x-amzn-query-error": f"{code};Sender"},
                )

            def _json(self, status: int, payload: object, extra: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.0")
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
