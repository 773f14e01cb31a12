"""OTLP sinks from the `oteltest` package (PyPI), for podscope's exporter tests.

oteltest is the OpenTelemetry Python project's test harness by one of its maintainers; its
sinks decode OTLP with grpcio and the official `opentelemetry-proto` Python bindings, an
implementation independent of podscope's (Rust, prost). This script only starts them on the
given ports and prints every request they decode as one JSON line on stdout:
{"transport": "grpc"|"http", "signal": "traces"|"metrics"|"logs", "headers": {...},
 "request": <the request as protobuf's JSON mapping>}.

Usage: python oteltest_sink.py GRPC_PORT HTTP_PORT
"""

import json
import logging
import sys
import threading

import oteltest.sink
from google.protobuf.json_format import MessageToDict
from oteltest.sink import GrpcSink, HttpSink
from oteltest.sink.handler import RequestHandler


def _is_json_content_type(headers):
    # oteltest looks the header up as "Content-Type" only; HTTP header names are
    # case-insensitive (RFC 9110) and hyper sends them lowercase. Decoding stays protobuf's.
    return any(
        k.lower() == "content-type" and "application/json" in v.lower() for k, v in headers.items()
    )


oteltest.sink._is_json_content_type = _is_json_content_type

lock = threading.Lock()


class JsonLines(RequestHandler):
    def __init__(self, transport):
        self.transport = transport

    def emit(self, signal, request, headers):
        line = json.dumps(
            {
                "transport": self.transport,
                "signal": signal,
                "headers": {str(k).lower(): str(v) for k, v in dict(headers or {}).items()},
                "request": MessageToDict(request),
            }
        )
        with lock:
            print(line, flush=True)

    def handle_logs(self, request, headers):
        self.emit("logs", request, headers)

    def handle_metrics(self, request, headers):
        self.emit("metrics", request, headers)

    def handle_trace(self, request, headers):
        self.emit("traces", request, headers)


def main():
    grpc_port, http_port = int(sys.argv[1]), int(sys.argv[2])
    logger = logging.getLogger("oteltest-sink")
    grpc_sink = GrpcSink(JsonLines("grpc"), logger, port=grpc_port)
    grpc_sink.start()
    http_sink = HttpSink(JsonLines("http"), logger, port=http_port)
    http_sink.start()
    print("ready", flush=True)
    # Runs until the test kills it.
    threading.Event().wait()


if __name__ == "__main__":
    main()
