"""Steady OTLP/gRPC load for the soak (scripts/soak.sh): traces and metrics export requests made
with the official OpenTelemetry protobuf definitions (the `opentelemetry-proto` Python package)
and sent with grpcio, at a fixed pace, until SIGTERM. Prints one JSON line of totals at exit.

    python otlp_load.py <grpc port> [requests per second] [items per request]

Each request is new data (span ids, timestamps and metric values change), as applications send.
A refused request (the agent's memory limiter, a full queue) is counted, not retried.
"""

import json
import os
import signal
import sys
import time

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


def attribute(key, value):
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))


RESOURCE = resource_pb2.Resource(
    attributes=[attribute("service.name", "soak-load"), attribute("host.name", "soak")]
)


def spans_request(sequence, items):
    now = time.time_ns()
    spans = [
        trace_pb2.Span(
            trace_id=sequence.to_bytes(8, "big") + i.to_bytes(8, "big"),
            span_id=(i + 1).to_bytes(8, "big"),
            name=f"GET /items/{i % 20}",
            kind=trace_pb2.Span.SPAN_KIND_SERVER,
            start_time_unix_nano=now - 3_000_000,
            end_time_unix_nano=now,
            attributes=[attribute("http.request.method", "GET"), attribute("http.route", f"/items/{i % 20}")],
        )
        for i in range(items)
    ]
    return trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[trace_pb2.ResourceSpans(resource=RESOURCE, scope_spans=[trace_pb2.ScopeSpans(spans=spans)])]
    )


def metrics_request(sequence, items):
    now = time.time_ns()
    points = [
        metrics_pb2.NumberDataPoint(
            attributes=[attribute("route", f"/items/{i % 20}")],
            start_time_unix_nano=now - 10_000_000_000,
            time_unix_nano=now,
            as_int=sequence * items + i,
        )
        for i in range(items)
    ]
    metric = metrics_pb2.Metric(
        name="soak.requests",
        sum=metrics_pb2.Sum(
            data_points=points,
            aggregation_temporality=metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE,
            is_monotonic=True,
        ),
    )
    return metrics_service_pb2.ExportMetricsServiceRequest(
        resource_metrics=[metrics_pb2.ResourceMetrics(resource=RESOURCE, scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metric])])]
    )


def main():
    port = int(sys.argv[1])
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    items = int(sys.argv[3]) if len(sys.argv) > 3 else 50
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    traces = trace_service_pb2_grpc.TraceServiceStub(channel)
    metrics = metrics_service_pb2_grpc.MetricsServiceStub(channel)
    totals = {"requests_ok": 0, "requests_refused": 0, "items_sent": 0}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    sequence = 0
    next_send = time.monotonic()
    while not stopping:
        sequence += 1
        for send, request in (
            (traces.Export, spans_request(sequence, items)),
            (metrics.Export, metrics_request(sequence, items)),
        ):
            try:
                send(request, timeout=10)
                totals["requests_ok"] += 1
                totals["items_sent"] += items
            except grpc.RpcError:
                totals["requests_refused"] += 1
        next_send += 1.0 / rate
        pause = next_send - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            next_send = time.monotonic()
    print(json.dumps(totals), flush=True)


if __name__ == "__main__":
    main()
