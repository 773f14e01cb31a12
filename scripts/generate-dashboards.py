#!/usr/bin/env python3
"""Generates the chart's Grafana dashboards and alert rules from one table of queries.

Every PromQL expression podscope ships lives in this file, once: the dashboards
(helm/podscope/dashboards/*.json, loaded by Grafana's sidecar through the chart's ConfigMaps), the
alert rules (helm/podscope/rules/podscope-alerts.yaml, the plain rules file, also the chart's
PrometheusRule) and the list the real-data test runs (helm/podscope/tests/queries.json, read by
integration/tests/agent/dashboards.rs) are all written from it. Do not edit those files by hand.

    scripts/generate-dashboards.py           rewrite the generated files
    scripts/generate-dashboards.py --check   fail when they differ from what this file generates

A script and not a crate: it is data plus a few functions, runs in CI without a build, and needs
only Python's standard library.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "podscope"

# Grafana variables every per-pod dashboard has. `workload` is `service_name`: the k8sattributes
# processor sets service.name to the pod's workload (Deployment, StatefulSet, DaemonSet, Job…,
# unless an annotation or app.kubernetes.io/name says otherwise) and the chart's prometheus
# exporter promotes it to a label. "All" is `.*`, which also matches series without the label
# (a Prometheus without a `cluster` label, the node's own cgroups).
POD = 'cluster=~"$cluster", k8s_namespace_name=~"$namespace", service_name=~"$workload", k8s_pod_name=~"$pod"'
AGENT = 'cluster=~"$cluster", instance=~"$instance"'
RATE = "$__rate_interval"
# The http probe is opt-in (off in the chart's default config: it costs the traced workload more
# than the other probes, BENCHMARKS.md). Its panels use the semantic-convention names. The
# real-data test turns it on, as a user does in the chart's values, and runs them.
NEEDS_HTTP = "the http probe (receivers.ebpf.probes.http), off in the chart's default config"
# syscalls, files and sched are opt-in too: the default runs no program on every syscall or
# context switch (issue 11; their cost per event is in docs/metrics.md). The real-data test turns
# them on as a user does in the chart's values, one line each.
NEEDS_SYSCALLS = "the syscalls probe (receivers.ebpf.probes.syscalls), off in the chart's default config"
NEEDS_FILES = "the files probe (receivers.ebpf.probes.files), off in the chart's default config"
NEEDS_SCHED = "the sched probe (receivers.ebpf.probes.sched), off in the chart's default config"
# CPU time is the kubelet's figure (cAdvisor, which every cluster's Prometheus usually scrapes):
# podscope has no on-CPU time metric of its own. No kubelet runs where the real-data test runs.
NEEDS_CADVISOR = "cAdvisor's container metrics (scraped from the kubelet); no kubelet runs here"
# What panels require that the real-data test provides (the rest is skipped there, with the reason).
PROVIDED_BY_THE_TEST = {NEEDS_HTTP, NEEDS_SYSCALLS, NEEDS_FILES, NEEDS_SCHED}
# How the chart README's panel table says what a panel needs.
REQUIREMENT_NOTES = {
    None: "",
    NEEDS_HTTP: " (needs the http probe)",
    NEEDS_SYSCALLS: " (needs the syscalls probe)",
    NEEDS_FILES: " (needs the files probe)",
    NEEDS_SCHED: " (needs the sched probe)",
    NEEDS_CADVISOR: " (needs cAdvisor, from the kubelet)",
}
# cAdvisor's labels for the same pods the podscope variables select (pod names are the same strings).
CADVISOR_POD = 'cluster=~"$cluster", namespace=~"$namespace", pod=~"$pod", container!=""'


# Every pod the eBPF receiver has data for has a `target_info` series with its resource
# attributes (podscope.cgroup.id is the receiver's own, so other OTLP sources are not listed),
# whichever probes are on.
PODS = 'target_info{podscope_cgroup_id!=""'
POD_VARIABLES = [
    ("cluster", "Cluster", f"label_values({PODS}}}, cluster)"),
    ("namespace", "Namespace", f'label_values({PODS}, cluster=~"$cluster"}}, k8s_namespace_name)'),
    ("workload", "Workload", f'label_values({PODS}, cluster=~"$cluster", k8s_namespace_name=~"$namespace"}}, service_name)'),
    ("pod", "Pod", f'label_values({PODS}, cluster=~"$cluster", k8s_namespace_name=~"$namespace", service_name=~"$workload"}}, k8s_pod_name)'),
]
AGENT_VARIABLES = [
    ("cluster", "Cluster", "label_values(podscope_receiver_accepted_items_total, cluster)"),
    ("instance", "Agent", 'label_values(podscope_receiver_accepted_items_total{cluster=~"$cluster"}, instance)'),
]


def series(title, unit, exprs, description, requires=None):
    """A time-series panel: exprs is [(expr, legend)]."""
    return {"kind": "timeseries", "shown": "time series", "title": title, "unit": unit, "exprs": exprs,
            "description": description, "requires": requires}


def heatmap(title, metric, selector, description, requires=None):
    """An exponential histogram (classic `le` buckets on the wire) as a heatmap of its buckets."""
    expr = f"sum by (le) (increase({metric}_bucket{{{selector}}}[{RATE}]))"
    return {"kind": "heatmap", "shown": "heatmap", "title": title, "unit": "s", "exprs": [(expr, "{{le}}")],
            "description": description, "requires": requires}


def quantiles(title, metric, selector, by, description, requires=None):
    """p50 / p90 / p99 of a histogram, per `by`."""
    exprs = [
        (f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
         f"p{int(q * 100)} {{{{{by}}}}}")
        for q in (0.5, 0.9, 0.99)
    ]
    return {"kind": "timeseries", "shown": "p50 / p90 / p99", "title": title, "unit": "s", "exprs": exprs,
            "description": description, "requires": requires}


DASHBOARDS = [
    {
        "file": "podscope-node-pods.json",
        "uid": "podscope-node-pods",
        "title": "podscope / Node and pods",
        "description": "Per pod: processes, and with the opt-in probes scheduler run-queue latency and context switches, syscalls and their errors, file opens; per node: block I/O.",
        "variables": POD_VARIABLES,
        "panels": [
            series("CPU by pod", "short", [
                (f"sum by (pod) (rate(container_cpu_usage_seconds_total{{{CADVISOR_POD}}}[{RATE}]))", "{{pod}}")],
                "CPU cores used by the selected pods' containers, from the kubelet's cAdvisor metrics "
                "(with pod = All, every pod of the namespace: cAdvisor has no workload label).",
                NEEDS_CADVISOR),
            heatmap("Run-queue latency", "podscope_sched_runqueue_latency_seconds", POD,
                    "Time threads of the selected pods waited runnable for a CPU (sched probe).", NEEDS_SCHED),
            quantiles("Run-queue latency by pod", "podscope_sched_runqueue_latency_seconds", POD, "k8s_pod_name",
                      "p50/p90/p99 of the time threads waited for a CPU: CPU starvation or throttling shows here first.",
                      NEEDS_SCHED),
            series("Context switches by pod", "ops", [
                (f"sum by (k8s_pod_name, podscope_sched_switch) (rate(podscope_sched_context_switches_total{{{POD}}}[{RATE}]))",
                 "{{k8s_pod_name}} {{podscope_sched_switch}}")],
                "Voluntary (blocked) and involuntary (preempted) switches away from the pods' threads: many involuntary ones mean CPU contention.",
                NEEDS_SCHED),
            series("Syscalls by pod and group", "ops", [
                (f"sum by (k8s_pod_name, podscope_syscall_group) (rate(podscope_syscalls_total{{{POD}}}[{RATE}]))",
                 "{{k8s_pod_name}} {{podscope_syscall_group}}")],
                "System calls completed per second (syscalls probe).", NEEDS_SYSCALLS),
            series("Syscall errors by pod and group", "ops", [
                (f"sum by (k8s_pod_name, podscope_syscall_group) (rate(podscope_syscalls_errors_total{{{POD}}}[{RATE}]))",
                 "{{k8s_pod_name}} {{podscope_syscall_group}}")],
                "System calls that returned an error, per second.", NEEDS_SYSCALLS),
            series("File opens by pod", "ops", [
                (f"sum by (k8s_pod_name) (rate(podscope_files_opens_total{{{POD}}}[{RATE}]))", "{{k8s_pod_name}}"),
                (f"sum by (k8s_pod_name, error_type) (rate(podscope_files_open_errors_total{{{POD}}}[{RATE}]))",
                 "{{k8s_pod_name}} failed: {{error_type}}")],
                "Opens per second, and failed opens by errno (files probe).", NEEDS_FILES),
            series("Processes by pod", "ops", [
                (f"sum by (k8s_pod_name) (rate(podscope_process_execs_total{{{POD}}}[{RATE}]))", "{{k8s_pod_name}} execs"),
                (f"sum by (k8s_pod_name) (rate(podscope_process_forks_total{{{POD}}}[{RATE}]))", "{{k8s_pod_name}} forks")],
                "Programs executed and processes created per second (process probe)."),
            heatmap("Block I/O latency (node)", "podscope_block_latency_seconds", 'cluster=~"$cluster"',
                    "Block request latency, issue to completion, on the nodes of the cluster (block_io probe: per node, not per pod)."),
            quantiles("Block I/O latency by device", "podscope_block_latency_seconds", 'cluster=~"$cluster"', "system_device",
                      "p50/p90/p99 of block request latency per device."),
            series("Block I/O throughput by device", "Bps", [
                (f'sum by (host_name, system_device, podscope_block_operation) (rate(podscope_block_io_bytes_total{{cluster=~"$cluster"}}[{RATE}]))',
                 "{{host_name}} {{system_device}} {{podscope_block_operation}}")],
                "Bytes completed by block requests per second."),
        ],
    },
    {
        "file": "podscope-network.json",
        "uid": "podscope-network",
        "title": "podscope / Network",
        "description": "Per pod and peer: TCP connections, failures, retransmits, bytes and round-trip time (tcp probe).",
        "variables": POD_VARIABLES,
        "panels": [
            series("Connections opened by pod and peer", "ops", [
                (f"sum by (k8s_pod_name, network_peer_address, server_port, podscope_tcp_role) (rate(podscope_tcp_connections_opened_total{{{POD}}}[{RATE}]))",
                 "{{k8s_pod_name}} {{podscope_tcp_role}} {{network_peer_address}}:{{server_port}}")],
                "TCP connections established per second, as client or server."),
            series("Connection failures by pod, peer and reason", "ops", [
                (f"sum by (k8s_pod_name, network_peer_address, server_port, error_type) (rate(podscope_tcp_connections_failed_total{{{POD}}}[{RATE}]))",
                 "{{k8s_pod_name}} {{network_peer_address}}:{{server_port}} {{error_type}}")],
                "Connection attempts that failed (refused, timeout, reset)."),
            series("Retransmits by pod and peer", "ops", [
                (f"sum by (k8s_pod_name, network_peer_address, server_port) (rate(podscope_tcp_retransmits_total{{{POD}}}[{RATE}]))",
                 "{{k8s_pod_name}} {{network_peer_address}}:{{server_port}}")],
                "TCP segments retransmitted per second."),
            series("Bytes by pod and direction", "Bps", [
                (f"sum by (k8s_pod_name, network_io_direction) (rate(podscope_tcp_io_bytes_total{{{POD}}}[{RATE}]))",
                 "{{k8s_pod_name}} {{network_io_direction}}")],
                "Bytes sent (acknowledged) and received on TCP connections."),
            heatmap("Round-trip time of closed connections", "podscope_tcp_rtt_seconds", POD,
                    "Smoothed RTT of connections when they closed."),
            quantiles("Round-trip time by pod", "podscope_tcp_rtt_seconds", POD, "k8s_pod_name",
                      "p50/p90/p99 of the smoothed RTT of closed connections."),
            quantiles("Round-trip time of open connections by pod", "podscope_tcp_rtt_open_seconds", POD, "k8s_pod_name",
                      "p50/p90/p99 of the smoothed RTT of open connections, sampled at each collection."),
            quantiles("Connection duration by pod", "podscope_tcp_connection_duration_seconds", POD, "k8s_pod_name",
                      "p50/p90/p99 of connection lifetimes, established to closed."),
        ],
    },
    {
        "file": "podscope-http-red.json",
        "uid": "podscope-http-red",
        "title": "podscope / HTTP and gRPC RED",
        "description": "Rate, errors and duration of HTTP and gRPC requests, server and client side, per pod and route (http probe).",
        "variables": POD_VARIABLES,
        "panels": [
            series("Server requests by pod and route", "reqps", [
                (f"sum by (k8s_pod_name, http_route) (rate(http_server_request_duration_seconds_count{{{POD}}}[{RATE}]))",
                 "{{k8s_pod_name}} {{http_route}}")],
                "Requests served per second.", NEEDS_HTTP),
            series("Server errors by pod and route", "percentunit", [
                (f'sum by (k8s_pod_name, http_route) (rate(http_server_request_duration_seconds_count{{{POD}, http_response_status_code=~"5.."}}[{RATE}]))'
                 f" / sum by (k8s_pod_name, http_route) (rate(http_server_request_duration_seconds_count{{{POD}}}[{RATE}]))",
                 "{{k8s_pod_name}} {{http_route}}")],
                "Share of requests answered with a 5xx status.", NEEDS_HTTP),
            heatmap("Server request duration", "http_server_request_duration_seconds", POD,
                    "Duration of served requests.", NEEDS_HTTP),
            quantiles("Server request duration by route", "http_server_request_duration_seconds", POD, "http_route",
                      "p50/p90/p99 of served requests' duration.", NEEDS_HTTP),
            series("Client requests by pod and server", "reqps", [
                (f"sum by (k8s_pod_name, server_address) (rate(http_client_request_duration_seconds_count{{{POD}}}[{RATE}]))",
                 "{{k8s_pod_name}} → {{server_address}}")],
                "Requests sent per second.", NEEDS_HTTP),
            series("Client errors by pod and server", "percentunit", [
                (f'sum by (k8s_pod_name, server_address) (rate(http_client_request_duration_seconds_count{{{POD}, error_type!=""}}[{RATE}]))'
                 f" / sum by (k8s_pod_name, server_address) (rate(http_client_request_duration_seconds_count{{{POD}}}[{RATE}]))",
                 "{{k8s_pod_name}} → {{server_address}}")],
                "Share of requests that failed (error.type set: a 5xx, a reset, a timeout).", NEEDS_HTTP),
            quantiles("Client request duration by server", "http_client_request_duration_seconds", POD, "server_address",
                      "p50/p90/p99 of sent requests' duration.", NEEDS_HTTP),
            series("gRPC server calls by pod, method and status", "reqps", [
                (f"sum by (k8s_pod_name, rpc_service, rpc_method, rpc_grpc_status_code) (rate(rpc_server_call_duration_seconds_count{{{POD}}}[{RATE}]))",
                 "{{k8s_pod_name}} {{rpc_service}}/{{rpc_method}} {{rpc_grpc_status_code}}")],
                "gRPC calls served per second, by status code (0 is OK).", NEEDS_HTTP),
            series("gRPC server calls not OK by pod and method", "percentunit", [
                (f'sum by (k8s_pod_name, rpc_service, rpc_method) (rate(rpc_server_call_duration_seconds_count{{{POD}, rpc_grpc_status_code!="0"}}[{RATE}]))'
                 f" / sum by (k8s_pod_name, rpc_service, rpc_method) (rate(rpc_server_call_duration_seconds_count{{{POD}}}[{RATE}]))",
                 "{{k8s_pod_name}} {{rpc_service}}/{{rpc_method}}")],
                "Share of calls served that ended with a status other than OK (server errors such as "
                "INTERNAL or UNAVAILABLE, and answers such as NOT_FOUND: the first panel tells them apart).", NEEDS_HTTP),
            quantiles("gRPC server call duration by method", "rpc_server_call_duration_seconds", POD, "rpc_method",
                      "p50/p90/p99 of served calls' duration.", NEEDS_HTTP),
            series("gRPC client calls by pod, server and method", "reqps", [
                (f"sum by (k8s_pod_name, server_address, rpc_service, rpc_method, rpc_grpc_status_code) (rate(rpc_client_call_duration_seconds_count{{{POD}}}[{RATE}]))",
                 "{{k8s_pod_name}} → {{server_address}} {{rpc_service}}/{{rpc_method}} {{rpc_grpc_status_code}}")],
                "gRPC calls made per second, by status code (0 is OK).", NEEDS_HTTP),
            series("gRPC client errors by pod and method", "percentunit", [
                (f'sum by (k8s_pod_name, rpc_service, rpc_method) (rate(rpc_client_call_duration_seconds_count{{{POD}, error_type!=""}}[{RATE}]))'
                 f" / sum by (k8s_pod_name, rpc_service, rpc_method) (rate(rpc_client_call_duration_seconds_count{{{POD}}}[{RATE}]))",
                 "{{k8s_pod_name}} {{rpc_service}}/{{rpc_method}}")],
                "Share of calls made that failed (error.type set: every status but OK).", NEEDS_HTTP),
            quantiles("gRPC client call duration by method", "rpc_client_call_duration_seconds", POD, "rpc_method",
                      "p50/p90/p99 of made calls' duration.", NEEDS_HTTP),
        ],
    },
    {
        "file": "podscope-agent-health.json",
        "uid": "podscope-agent-health",
        "title": "podscope / Agent health",
        "description": "The agents themselves: items accepted, refused and dropped per component, queues, export failures, kernel map memory, events lost in the kernel, skipped probes.",
        "variables": AGENT_VARIABLES,
        "panels": [
            series("Items accepted and refused by receiver", "ops", [
                (f'sum by (instance, component, signal, outcome) (label_replace(rate(podscope_receiver_accepted_items_total{{{AGENT}}}[{RATE}]), "outcome", "accepted", "", "")'
                 f' or label_replace(rate(podscope_receiver_refused_items_total{{{AGENT}}}[{RATE}]), "outcome", "refused", "", ""))',
                 "{{instance}} {{component}} {{signal}} {{outcome}}")],
                "Items receivers pushed into their pipelines, and items the pipelines refused (the sender was told to retry)."),
            series("Items sent by exporter", "ops", [
                (f"sum by (instance, component, signal) (rate(podscope_exporter_sent_items_total{{{AGENT}}}[{RATE}]))",
                 "{{instance}} {{component}} {{signal}}")],
                "Items exporters' backends accepted."),
            series("Items dropped", "ops", [
                (f"sum by (instance, component, reason) (rate(podscope_exporter_dropped_items_total{{{AGENT}}}[{RATE}]))"
                 f" or sum by (instance, component, reason) (rate(podscope_processor_dropped_items_total{{{AGENT}}}[{RATE}]))"
                 f' or label_replace(sum by (instance, queue) (rate(podscope_queue_dropped_items_total{{{AGENT}}}[{RATE}])), "reason", "queue full", "", "")',
                 "{{instance}} {{component}}{{queue}} {{reason}}")],
                "Items lost by exporters, processors and full drop_newest queues (docs/telemetry.md); these series exist once something was lost."),
            series("Queue fill", "percentunit", [
                (f"max by (instance, queue) (podscope_queue_size{{{AGENT}}} / podscope_queue_capacity{{{AGENT}}})",
                 "{{instance}} {{queue}}")],
                "Items waiting in each queue, as a share of its capacity."),
            series("Export failures", "ops", [
                (f"sum by (instance, component, reason) (rate(podscope_exporter_send_failures_total{{{AGENT}}}[{RATE}]))",
                 "{{instance}} {{component}} {{reason}}")],
                "Failed export attempts per second (each retry counts)."),
            series("Export duration p99", "s", [
                (f"histogram_quantile(0.99, sum by (le, instance, component) (rate(podscope_exporter_send_duration_seconds_bucket{{{AGENT}}}[{RATE}])))",
                 "{{instance}} {{component}}")],
                "p99 duration of export attempts."),
            series("Kernel map memory", "bytes", [
                (f"sum by (instance) (podscope_ebpf_map_memory_total_bytes{{{AGENT}}})", "{{instance}} total"),
                (f"topk(10, max by (instance, probe, map) (podscope_ebpf_map_memory_bytes{{{AGENT}}}))",
                 "{{instance}} {{probe}}/{{map}}")],
                "Kernel memory of the agents' eBPF maps: charged to the agent's memory cgroup, not in its RSS."),
            series("Events lost in the kernel", "ops", [
                (f"sum by (instance, ring) (rate(podscope_ebpf_ringbuf_lost_events_total{{{AGENT}}}[{RATE}]))",
                 "{{instance}} ring {{ring}}"),
                (f"sum by (instance, probe, map) (rate(podscope_ebpf_map_full_total{{{AGENT}}}[{RATE}]))",
                 "{{instance}} {{probe}}/{{map}} full")],
                "Events dropped by full ring buffers, and inserts refused by full maps."),
            series("Skipped probes", "short", [
                (f"max by (instance, probe) (podscope_ebpf_probe_skipped{{{AGENT}}})", "{{instance}} {{probe}}")],
                "1 for each enabled probe that could not attach (the agent's log says why)."),
            series("Kubernetes metadata", "short", [
                (f"sum by (instance, state) (podscope_k8s_metadata_pods{{{AGENT}}})", "{{instance}} pods {{state}}"),
                (f"sum by (instance, reason) (rate(podscope_k8sattributes_unresolved_resources_total{{{AGENT}}}[{RATE}]))",
                 "{{instance}} unresolved {{reason}}")],
                "Pods cached by the k8s_metadata extension, and resources the k8sattributes processor could not match to a pod."),
        ],
    },
]

# Alert rules. `signal` is what the real-data test runs and must find series for (the data the
# alert reads, before any condition); `expr` must parse and not fire there. `requires` names what
# the real-data test cannot provide here.
JOB = 'job=~".*podscope.*"'


def loss(metric, by):
    """Items lost in the last 10 minutes, > 0. A loss counter's series is created by its first
    loss, already above 0, where increase() sees nothing: such new series count as they are."""
    return (f"sum by ({by}) (increase({metric}[10m])) > 0"
            f" or sum by ({by}) ({metric} unless {metric} offset 10m) > 0")


ALERTS = [
    {
        "alert": "PodscopeAgentDown",
        "signal": f"up{{{JOB}}}",
        "expr": f"up{{{JOB}}} == 0",
        "for": "5m",
        "severity": "critical",
        "summary": "podscope agent {{ $labels.instance }} is down",
        "description": "Prometheus has not scraped the podscope agent at {{ $labels.instance }} for 5 minutes: its node has no eBPF data.",
    },
    {
        "alert": "PodscopeDataDropped",
        "signal": "podscope_exporter_dropped_items_total",
        "expr": loss("podscope_exporter_dropped_items_total", "cluster, instance, component, reason"),
        "for": "0m",
        "severity": "warning",
        "summary": "podscope agent {{ $labels.instance }} dropped data in {{ $labels.component }}",
        "description": "{{ $value }} items were dropped by {{ $labels.component }} ({{ $labels.reason }}) in the last 10 minutes.",
    },
    {
        "alert": "PodscopePipelineDropped",
        "signal": "podscope_processor_dropped_items_total or podscope_queue_dropped_items_total",
        "expr": loss("podscope_processor_dropped_items_total", "cluster, instance, component, reason")
                + " or " + loss("podscope_queue_dropped_items_total", "cluster, instance, queue"),
        "for": "0m",
        "severity": "warning",
        "summary": "podscope agent {{ $labels.instance }} dropped data in its pipeline",
        "description": "{{ $value }} items were dropped by a processor or a full queue ({{ $labels.component }}{{ $labels.queue }}) in the last 10 minutes.",
    },
    {
        "alert": "PodscopeExporterFailing",
        "signal": "podscope_exporter_send_failures_total",
        "expr": "sum by (cluster, instance, component) (rate(podscope_exporter_send_failures_total[5m])) > 0",
        "for": "10m",
        "severity": "warning",
        "summary": "podscope exporter {{ $labels.component }} on {{ $labels.instance }} keeps failing",
        "description": "{{ $labels.component }} has failed export attempts for 10 minutes ({{ $value }} per second); data is retried, then dropped.",
    },
    {
        "alert": "PodscopeKernelEventsLost",
        "signal": "podscope_ebpf_ringbuf_lost_events_total",
        "expr": "sum by (cluster, instance, ring) (increase(podscope_ebpf_ringbuf_lost_events_total[10m])) > 0",
        "for": "0m",
        "severity": "warning",
        "summary": "podscope agent {{ $labels.instance }} lost kernel events on ring {{ $labels.ring }}",
        "description": "The kernel dropped {{ $value }} events in 10 minutes because the ring buffer {{ $labels.ring }} was full.",
    },
    {
        "alert": "PodscopeKernelMapFull",
        "signal": "podscope_ebpf_map_full_total",
        "expr": "sum by (cluster, instance, probe, map) (increase(podscope_ebpf_map_full_total[10m])) > 0",
        "for": "0m",
        "severity": "warning",
        "summary": "podscope map {{ $labels.probe }}/{{ $labels.map }} on {{ $labels.instance }} is full",
        "description": "The kernel refused {{ $value }} inserts into {{ $labels.probe }}/{{ $labels.map }} in 10 minutes: those events were lost.",
    },
    {
        "alert": "PodscopeProbeSkipped",
        "signal": "podscope_ebpf_probe_skipped",
        "expr": "max by (cluster, instance, probe) (podscope_ebpf_probe_skipped) > 0",
        "for": "5m",
        "severity": "warning",
        "summary": "podscope probe {{ $labels.probe }} is not attached on {{ $labels.instance }}",
        "description": "The enabled probe {{ $labels.probe }} could not attach and was skipped; the agent's log says why.",
    },
    {
        "alert": "PodscopeK8sMetadataNotSynced",
        "signal": 'podscope_k8sattributes_unresolved_resources_total{reason="not_synced"} or podscope_k8s_metadata_watch_errors_total',
        "expr": 'sum by (cluster, instance) (rate(podscope_k8sattributes_unresolved_resources_total{reason="not_synced"}[5m])) > 0'
                " or sum by (cluster, instance) (rate(podscope_k8s_metadata_watch_errors_total[5m])) > 0",
        "for": "15m",
        "severity": "warning",
        "summary": "podscope agent {{ $labels.instance }} has no Kubernetes metadata",
        "description": "For 15 minutes the agent could not list or watch pods: its data lacks pod and workload attributes.",
    },
    {
        "alert": "PodscopeMemoryNearLimit",
        # cAdvisor's working set includes the kernel memory charged to the container: the eBPF maps.
        "signal": 'container_memory_working_set_bytes{container="podscope"}',
        "expr": 'max by (cluster, namespace, pod) (container_memory_working_set_bytes{container="podscope"}'
                ' / (container_spec_memory_limit_bytes{container="podscope"} > 0)) > 0.9',
        "for": "15m",
        "severity": "warning",
        "summary": "podscope pod {{ $labels.namespace }}/{{ $labels.pod }} is near its memory limit",
        "description": "The agent uses {{ $value | humanizePercentage }} of its memory limit (process and eBPF maps); at the limit it is OOM-killed.",
        "requires": "cAdvisor's container metrics (scraped from the kubelet); no kubelet runs here",
    },
]


def grafana_variable(name, label, query):
    return {
        "name": name, "label": label, "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": f"{name}-variable"},
        "definition": query, "refresh": 2, "sort": 1,
        "includeAll": True, "allValue": ".*", "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def grafana_panel(panel, index, panel_id):
    targets = [
        {"refId": chr(ord("A") + i), "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "expr": expr, "legendFormat": legend, **({"format": "heatmap"} if panel["kind"] == "heatmap" else {})}
        for i, (expr, legend) in enumerate(panel["exprs"])
    ]
    description = panel["description"]
    if panel["requires"]:
        description += f" Needs {panel['requires'].split(' is not')[0]}."
    out = {
        "id": panel_id, "type": panel["kind"], "title": panel["title"], "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": panel["unit"]}, "overrides": []},
    }
    if panel["kind"] == "heatmap":
        out["options"] = {"calculate": False, "yAxis": {"unit": "s"}, "cellGap": 1,
                          "color": {"mode": "scheme", "scheme": "Oranges"}, "tooltip": {"show": True, "yHistogram": True}}
    else:
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    return out


def grafana_dashboard(d):
    variables = [{"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
                  "current": {}, "hide": 0}]
    variables += [grafana_variable(*v) for v in d["variables"]]
    return {
        "uid": d["uid"], "title": d["title"], "description": d["description"] + " Generated by scripts/generate-dashboards.py.",
        "tags": ["podscope"], "editable": True, "schemaVersion": 39, "version": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "timezone": "browser",
        "annotations": {"list": []}, "links": [],
        "templating": {"list": variables},
        "panels": [grafana_panel(p, i, i + 1) for i, p in enumerate(d["panels"])],
    }


def quote(text):
    # JSON strings are YAML double-quoted scalars.
    return json.dumps(text, ensure_ascii=False)


def rules_file():
    lines = [
        "# podscope's alert rules, a plain Prometheus rules file (also the chart's PrometheusRule).",
        "# Generated by scripts/generate-dashboards.py; runbooks in docs/operations.md.",
        "groups:",
        "  - name: podscope",
        "    rules:",
    ]
    for a in ALERTS:
        lines += [
            f"      - alert: {a['alert']}",
            f"        expr: {quote(a['expr'])}",
            f"        for: {a['for']}",
            "        labels:",
            f"          severity: {a['severity']}",
            "        annotations:",
            f"          summary: {quote(a['summary'])}",
            f"          description: {quote(a['description'])}",
            f"          runbook: {quote('docs/operations.md#' + a['alert'].lower())}",
        ]
    return "\n".join(lines) + "\n"


def queries():
    out = []
    for d in DASHBOARDS:
        for name, _, query in d["variables"]:
            out.append({"source": f"{d['file']} variable {name}", "variable": query})
        for p in d["panels"]:
            for expr, _ in p["exprs"]:
                entry = {"source": f"{d['file']} panel {p['title']!r}", "expr": expr}
                if p["requires"] and p["requires"] not in PROVIDED_BY_THE_TEST:
                    entry["skip"] = p["requires"]
                out.append(entry)
    for a in ALERTS:
        entry = {"source": f"alert {a['alert']}", "expr": a["expr"], "signal": a["signal"]}
        if a.get("requires"):
            entry["skip"] = a["requires"]
        out.append(entry)
    return out


README_BEGIN = "<!-- dashboards:begin -->"
README_END = "<!-- dashboards:end -->"


def readme_table():
    """The chart README's list of panels, and where each one's queries read from."""
    lines = ["| dashboard | panel | reads | shown as |", "|---|---|---|---|"]
    for d in DASHBOARDS:
        for p in d["panels"]:
            metrics = sorted({m for expr, _ in p["exprs"] for m in metric_names(expr)})
            shown = p["shown"]
            note = REQUIREMENT_NOTES[p["requires"]]
            lines.append(f"| {d['title'].split(' / ')[1]} | {p['title']}{note} | {', '.join(f'`{m}`' for m in metrics)} | {shown} |")
    lines += ["", "| alert | severity | reads | fires when |", "|---|---|---|---|"]
    for a in ALERTS:
        metrics = ", ".join(f"`{m}`" for m in sorted(metric_names(a["expr"])))
        summary = a["summary"].replace("{{ $labels.", "<").replace(" }}", ">")
        lines.append(f"| `{a['alert']}` | {a['severity']} | {metrics} | {summary} (for {a['for']}) |")
    return "\n".join(lines)


def metric_names(expr):
    """The metric names an expression reads (podscope's, the HTTP and RPC conventions', cAdvisor's,
    up), not its label names (`http_route` in `by (…)` or a matcher)."""
    labels = set(re.findall(r"\b([a-z_][a-z0-9_]*)\s*(?:=~|!~|!=|=)", expr))
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in group.split(",")}
    names = set(re.findall(r"\b(?:podscope|http|rpc|container)_[a-z0-9_]+", expr)) - labels
    return names | ({"up"} if re.search(r"\bup\{", expr) else set())


def with_readme(text):
    begin, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    return text[:begin] + "\n" + readme_table() + "\n" + text[end:]


def generated():
    files = {}
    readme = CHART / "README.md"
    files[readme] = with_readme(readme.read_text())
    for d in DASHBOARDS:
        files[CHART / "dashboards" / d["file"]] = json.dumps(grafana_dashboard(d), indent=2, ensure_ascii=False) + "\n"
    files[CHART / "rules" / "podscope-alerts.yaml"] = rules_file()
    files[CHART / "tests" / "queries.json"] = json.dumps(queries(), indent=2, ensure_ascii=False) + "\n"
    return files


def main(argv):
    check = argv[1:] == ["--check"]
    if argv[1:] and not check:
        print(__doc__, file=sys.stderr)
        return 2
    stale = []
    for path, text in generated().items():
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("generated files differ from scripts/generate-dashboards.py (run it): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
