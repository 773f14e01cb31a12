{{/*
Names, labels and the facts the manifests read from the podscope config (ports, whether the
k8sattributes processor needs the API server). The config is the one source of truth: ports are
never given twice.
*/}}

{{- define "podscope.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "podscope.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "podscope.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "podscope.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "podscope.selectorLabels" -}}
app.kubernetes.io/name: {{ include "podscope.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "podscope.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "podscope.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "podscope.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "podscope.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "podscope.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{/* The port of a "host:port" / "[::]:port" endpoint; fails on anything else. */}}
{{- define "podscope.portOf" -}}
{{- $port := regexFind "[0-9]+$" (toString .endpoint) }}
{{- if not $port }}
{{- fail (printf "%s: %q has no port; the chart exposes the port it names (host:port)" .key (toString .endpoint)) }}
{{- end }}
{{- $port }}
{{- end }}

{{/* The first component (by id, sorted) of a type in a config section, as its id; "" if none. */}}
{{- define "podscope.firstOfType" -}}
{{- $found := "" }}
{{- range $id := keys (default dict .section) | sortAlpha }}
{{- if and (not $found) (eq (first (splitList "/" $id)) $.type) }}
{{- $found = $id }}
{{- end }}
{{- end }}
{{- $found }}
{{- end }}

{{/* Port of the Prometheus scrape endpoint (first prometheus exporter), "" without one. */}}
{{- define "podscope.prometheusPort" -}}
{{- $exporters := default dict .Values.config.exporters }}
{{- $id := include "podscope.firstOfType" (dict "section" $exporters "type" "prometheus") }}
{{- if $id }}
{{- $settings := default dict (get $exporters $id) }}
{{- include "podscope.portOf" (dict "endpoint" (default "0.0.0.0:9464" $settings.endpoint) "key" (printf "config.exporters.%s.endpoint" $id)) }}
{{- end }}
{{- end }}

{{/* Port of the agent's own telemetry (/metrics, /healthz, /readyz). */}}
{{- define "podscope.telemetryPort" -}}
{{- $service := default dict .Values.config.service }}
{{- $telemetry := default dict $service.telemetry }}
{{- $metrics := default dict $telemetry.metrics }}
{{- $address := default "127.0.0.1:8888" $metrics.address | toString }}
{{- if or (hasPrefix "127." $address) (hasPrefix "localhost:" $address) (hasPrefix "[::1]:" $address) }}
{{- fail (printf "config.service.telemetry.metrics.address: %q is loopback; in a pod it must listen on 0.0.0.0 so the kubelet's health probes (/healthz, /readyz) can reach it" $address) }}
{{- end }}
{{- include "podscope.portOf" (dict "endpoint" $address "key" "config.service.telemetry.metrics.address") }}
{{- end }}

{{/* Port of an OTLP protocol (.protocol: grpc|http) of the first otlp receiver, "" if off. */}}
{{- define "podscope.otlpPort" -}}
{{- $receivers := default dict .root.Values.config.receivers }}
{{- $id := include "podscope.firstOfType" (dict "section" $receivers "type" "otlp") }}
{{- if $id }}
{{- $protocols := default dict (default dict (get $receivers $id)).protocols }}
{{- if hasKey $protocols .protocol }}
{{- $settings := default dict (get $protocols .protocol) }}
{{- $default := ternary "0.0.0.0:4317" "0.0.0.0:4318" (eq .protocol "grpc") }}
{{- include "podscope.portOf" (dict "endpoint" (default $default $settings.endpoint) "key" (printf "config.receivers.%s.protocols.%s.endpoint" $id .protocol)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
What the k8sattributes processors of the config read from the API server: "pods" when one uses
the in-cluster service account, plus "namespaces" / "nodes" when one extracts labels or
annotations from them. Comma-separated, "" when none needs the API server.
*/}}
{{- define "podscope.apiResources" -}}
{{- $resources := list }}
{{- $processors := default dict .Values.config.processors }}
{{- range $id, $settings := $processors }}
{{- if eq (first (splitList "/" $id)) "k8sattributes" }}
{{- $settings = default dict $settings }}
{{- if eq (default "serviceAccount" $settings.auth_type) "serviceAccount" }}
{{- $resources = append $resources "pods" }}
{{- $extract := default dict $settings.extract }}
{{- range $rule := concat (default list $extract.labels) (default list $extract.annotations) }}
{{- $from := default "pod" (default dict $rule).from }}
{{- if eq $from "namespace" }}{{ $resources = append $resources "namespaces" }}{{ end }}
{{- if eq $from "node" }}{{ $resources = append $resources "nodes" }}{{ end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $resources | uniq | join "," }}
{{- end }}
