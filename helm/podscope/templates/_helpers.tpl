{{/*
Names, labels and the facts the manifests read from the podscope config (ports, what the
k8s_metadata extensions read from the API server). The config is the one source of truth: ports are
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
The k8s_metadata extensions that run, the only parts of the agent that talk to the API server:
those service.extensions lists, and the one each k8sattributes processor a pipeline names runs
for itself when it names no `extension` (its settings are then the extension's). A JSON object:
config path ("extensions.<id>" or "processors.<id>") -> settings.
*/}}
{{- define "podscope.k8sMetadataInUse" -}}
{{- $config := default dict .Values.config }}
{{- $service := default dict $config.service }}
{{- $inUse := dict }}
{{- $extensions := default dict $config.extensions }}
{{- range $id := default list $service.extensions }}
{{- if eq (first (splitList "/" (toString $id))) "k8s_metadata" }}
{{- $_ := set $inUse (printf "extensions.%s" $id) (default dict (get $extensions (toString $id))) }}
{{- end }}
{{- end }}
{{- $named := list }}
{{- range $signal, $pipeline := default dict $service.pipelines }}
{{- $named = concat $named (default list (default dict $pipeline).processors) }}
{{- end }}
{{- range $id, $settings := default dict $config.processors }}
{{- if and (eq (first (splitList "/" $id)) "k8sattributes") (has $id $named) (not (hasKey (default dict $settings) "extension")) }}
{{- $_ := set $inUse (printf "processors.%s" $id) (default dict $settings) }}
{{- end }}
{{- end }}
{{- toJson $inUse }}
{{- end }}

{{/*
What the running k8s_metadata extensions read from the API server with the pod's service
account, as YAML: `cluster` (resources granted cluster-wide) and `namespaced` (namespace ->
resources). An extension reads with the service account when auth_type is serviceAccount or
unset (unset means in-cluster in a pod: the kubelet sets KUBERNETES_SERVICE_HOST); kubeConfig
brings its own identity, none reads nothing. It lists and watches pods, cluster-wide or only in
filter.namespace; namespaces (all of them) when a rule extracts `from: namespace`; nodes when
one extracts `from: node`; with peers.enabled, pods and services of the whole cluster (the peer
index). A cluster-wide pods grant makes namespaced ones redundant.
*/}}
{{- define "podscope.apiAccess" -}}
{{- $cluster := list }}
{{- $namespaced := dict }}
{{- $programs := eq (include "podscope.userPrograms" .) "true" }}
{{- $probes := eq (include "podscope.tenantProbes" .) "true" }}
{{- $sessions := eq (include "podscope.traceSessions" .) "true" }}
{{- if $programs }}
{{- /* EbpfProgram nodeSelectors read this node's labels. */}}
{{- $cluster = append $cluster "nodes" }}
{{- end }}
{{- range $path, $settings := include "podscope.k8sMetadataInUse" . | fromJson }}
{{- $auth := toString (default "serviceAccount" $settings.auth_type) }}
{{- if not (has $auth (list "serviceAccount" "kubeConfig" "none")) }}
{{- fail (printf "config.%s.auth_type: %q is not one of serviceAccount, kubeConfig, none (the chart derives RBAC from it)" $path $auth) }}
{{- end }}
{{- if eq $auth "serviceAccount" }}
{{- $filter := default dict $settings.filter }}
{{- $namespace := toString (default "" $filter.namespace) }}
{{- if contains "${" $namespace }}
{{- fail (printf "config.%s.filter.namespace: %q; the chart grants read access to pods by namespace name, so write the name itself" $path $namespace) }}
{{- end }}
{{- if $namespace }}
{{- $_ := set $namespaced $namespace (list "pods") }}
{{- else }}
{{- $cluster = append $cluster "pods" }}
{{- end }}
{{- $extract := default dict $settings.extract }}
{{- range $rule := concat (default list $extract.labels) (default list $extract.annotations) }}
{{- $from := toString (default "pod" (default dict $rule).from) }}
{{- if eq $from "namespace" }}{{ $cluster = append $cluster "namespaces" }}{{ end }}
{{- if eq $from "node" }}{{ $cluster = append $cluster "nodes" }}{{ end }}
{{- end }}
{{- if (default dict $settings.peers).enabled }}
{{- $cluster = concat $cluster (list "pods" "services") }}
{{- end }}
{{- end }}
{{- end }}
{{- if has "pods" $cluster }}
{{- $namespaced = dict }}
{{- end }}
{{- toYaml (dict "cluster" ($cluster | uniq | sortAlpha) "namespaced" $namespaced "programs" $programs "probes" $probes "sessions" $sessions) }}
{{- end }}

{{/*
Whether the agent runs users' EbpfProgram objects with the pod's service account: "true" or "".
An ebpf receiver's user_programs.extension names a k8s_metadata extension that runs (listed in
service.extensions) and reads the API server with the service account (auth_type
serviceAccount or unset). It then lists and watches ebpfprograms (podscope.dev) and its node,
patches ebpfprograms/status, creates Events in default and gets ConfigMaps in the release's
namespace (docs/programs.md, "RBAC").
*/}}
{{- define "podscope.userPrograms" -}}
{{- $config := default dict .Values.config }}
{{- $inUse := include "podscope.k8sMetadataInUse" . | fromJson }}
{{- range $id, $settings := default dict $config.receivers }}
{{- if eq (first (splitList "/" $id)) "ebpf" }}
{{- $extension := toString (default "" (default dict (default dict $settings).user_programs).extension) }}
{{- $used := get $inUse (printf "extensions.%s" $extension) }}
{{- if and $extension (kindIs "map" $used) (eq (toString (default "serviceAccount" $used.auth_type)) "serviceAccount") }}true{{ end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Whether the agents run TraceSession objects with the pod's service account: "true" or "".
session.traceSessions.extension names a k8s_metadata extension that runs (listed in
service.extensions), reads every namespace's pods and the API server with the service account.
The session extension then lists and watches tracesessions (podscope.dev) in every namespace,
patches tracesessions/status (each node its entry, and the merged fields) and deletes a session
once its ttlAfterFinished has passed (docs/sessions-agent.md, "TraceSession objects").
*/}}
{{- define "podscope.traceSessions" -}}
{{- $extension := toString (default "" (default dict .Values.session.traceSessions).extension) }}
{{- if and .Values.session.enabled $extension }}
{{- $used := get (include "podscope.k8sMetadataInUse" . | fromJson) (printf "extensions.%s" $extension) }}
{{- if not (and (hasPrefix "k8s_metadata" $extension) (kindIs "map" $used)) }}
{{- fail (printf "session.traceSessions.extension: %q is not a k8s_metadata extension listed in config.service.extensions (it watches the TraceSessions and knows the node's pods)" $extension) }}
{{- end }}
{{- if (default dict $used.filter).namespace }}
{{- fail (printf "session.traceSessions.extension: %q sets filter.namespace, so it knows the pods of one namespace only; TraceSessions are in any namespace: name an extension without it" $extension) }}
{{- end }}
{{- if eq (toString (default "serviceAccount" $used.auth_type)) "serviceAccount" }}true{{ end }}
{{- end }}
{{- end }}

{{/*
Whether the agent acts on namespaced Probe objects with the pod's service account: "true" or "".
An ebpf receiver's tenant_probes.extension names a k8s_metadata extension that runs (listed in
service.extensions) and reads the API server with the service account. It then lists and
watches probes (podscope.dev) in every namespace, patches probes/status and creates Events in
any namespace (docs/programs.md, "RBAC").
*/}}
{{- define "podscope.tenantProbes" -}}
{{- $config := default dict .Values.config }}
{{- $inUse := include "podscope.k8sMetadataInUse" . | fromJson }}
{{- range $id, $settings := default dict $config.receivers }}
{{- if eq (first (splitList "/" $id)) "ebpf" }}
{{- $extension := toString (default "" (default dict (default dict $settings).tenant_probes).extension) }}
{{- $used := get $inUse (printf "extensions.%s" $extension) }}
{{- if and $extension (kindIs "map" $used) (eq (toString (default "serviceAccount" $used.auth_type)) "serviceAccount") }}true{{ end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Whether the pod reads the API server with its service account: "true" or "". */}}
{{- define "podscope.readsApi" -}}
{{- $access := include "podscope.apiAccess" . | fromYaml }}
{{- if or $access.cluster $access.namespaced }}true{{ end }}
{{- end }}

{{/*
The environment variables the running k8s_metadata extensions take their node name from
(filter.node_from_env_var, default NODE_NAME), except where filter.node names the node or
auth_type none reads no API server. A JSON list; the DaemonSet sets each from spec.nodeName.
*/}}
{{- define "podscope.nodeNameVars" -}}
{{- $vars := list }}
{{- range $path, $settings := include "podscope.k8sMetadataInUse" . | fromJson }}
{{- $filter := default dict $settings.filter }}
{{- if and (ne (toString $settings.auth_type) "none") (not $filter.node) }}
{{- $vars = append $vars (toString (default "NODE_NAME" $filter.node_from_env_var)) }}
{{- end }}
{{- end }}
{{- toJson ($vars | uniq | sortAlpha) }}
{{- end }}

{{/*
A Kubernetes memory quantity (512Mi, 1Gi, 500M, 536870912) in whole MiB.
*/}}
{{- define "podscope.mebibytes" -}}
{{- $q := toString . -}}
{{- if hasSuffix "Gi" $q -}}{{ mul (trimSuffix "Gi" $q | atoi) 1024 }}
{{- else if hasSuffix "Mi" $q -}}{{ trimSuffix "Mi" $q | atoi }}
{{- else if hasSuffix "Ki" $q -}}{{ div (trimSuffix "Ki" $q | atoi) 1024 }}
{{- else if hasSuffix "G" $q -}}{{ div (mul (trimSuffix "G" $q | atoi) 1000000000) 1048576 }}
{{- else if hasSuffix "M" $q -}}{{ div (mul (trimSuffix "M" $q | atoi) 1000000) 1048576 }}
{{- else if hasSuffix "k" $q -}}{{ div (mul (trimSuffix "k" $q | atoi) 1000) 1048576 }}
{{- else -}}{{ div ($q | atoi) 1048576 }}
{{- end -}}
{{- end -}}
