{{/* Names, labels and the pieces the ferry pods share. */}}

{{- define "ferry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ferry.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ferry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "ferry.commonLabels" -}}
helm.sh/chart: {{ include "ferry.chart" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ferry
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/* ferryd pods (workers and teachers): the selector of all of them. */}}
{{- define "ferry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ferry.labels" -}}
{{ include "ferry.commonLabels" . }}
{{ include "ferry.selectorLabels" . }}
{{- end }}

{{/* The bundled etcd's pods. */}}
{{- define "ferry.etcd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferry.name" . }}-etcd
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: etcd
{{- end }}

{{- define "ferry.etcd.labels" -}}
{{ include "ferry.commonLabels" . }}
{{ include "ferry.etcd.selectorLabels" . }}
{{- end }}

{{- define "ferry.etcd.fullname" -}}
{{- printf "%s-etcd" (include "ferry.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ferry.etcd.headless" -}}
{{- printf "%s-etcd-peers" (include "ferry.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ferry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ferry.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ferry.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "ferry.authSecretName" -}}
{{- default (printf "%s-auth" (include "ferry.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "ferry.authSecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{- define "ferry.clusterName" -}}
{{- default (printf "%s-%s" .Release.Namespace .Release.Name) .Values.cluster.name }}
{{- end }}

{{- define "ferry.outputsClaim" -}}
{{- default (printf "%s-outputs" (include "ferry.fullname" .)) .Values.storage.outputs.existingClaim }}
{{- end }}

{{/* Whether the chart deploys its own etcd. */}}
{{- define "ferry.etcd.bundled" -}}
{{- if not .Values.etcd.external.endpoints }}true{{ end }}
{{- end }}

{{/* etcd's client URLs, comma-separated, as ferryd's `etcd` key wants them. */}}
{{- define "ferry.etcd.endpoints" -}}
{{- if .Values.etcd.external.endpoints }}
{{- join "," .Values.etcd.external.endpoints }}
{{- else }}
{{- $urls := list }}
{{- $fullname := include "ferry.etcd.fullname" . }}
{{- $peers := include "ferry.etcd.headless" . }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $urls = append $urls (printf "http://%s-%d.%s.%s.svc:2379" $fullname $i $peers $.Release.Namespace) }}
{{- end }}
{{- join "," $urls }}
{{- end }}
{{- end }}

{{/* Fixed paths inside the ferry pods. */}}
{{- define "ferry.paths" -}}
config: /etc/ferry/config
configFile: /etc/ferry/config/ferryd.yaml
etcdTls: /etc/ferry/etcd-tls
state: /var/lib/ferry
outputs: /srv/ferry/outputs
data: /srv/ferry/data
models: /srv/ferry/models
{{- end }}

{{/*
ferryd's config file for one role, in ferryd's own format (docs/ferryd.example.yaml).
Call with (dict "root" $ "role" "worker" "spec" .Values.workers).
*/}}
{{- define "ferry.ferrydConfig" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $c := $v.config }}
{{- $paths := include "ferry.paths" $root | fromYaml }}
{{- $cfg := dict
  "listen" (printf "%s:%d" (ternary (printf "[%s]" $v.api.bindAddress) $v.api.bindAddress (contains ":" $v.api.bindAddress)) (int $v.api.port))
  "data_dir" $paths.state
  "roots" (dict "data" $paths.data "models" $paths.models "outputs" $paths.outputs)
  "max_body_bytes" (int64 $c.maxBodyBytes)
  "max_running_jobs" (int $c.maxRunningJobs)
  "progress_interval_ms" (int64 $c.progressIntervalMs)
  "metrics_retention_s" (int64 $c.metricsRetentionSeconds)
  "log_format" $c.logFormat
  "store_prefix" $c.storePrefix
  "collective_timeout_ms" (int64 $c.collectiveTimeoutMs)
  "etcd" (include "ferry.etcd.endpoints" $root)
  "cluster" (include "ferry.clusterName" $root)
  "node_ttl_ms" (int64 $c.nodeTtlMs)
  "role" .role
}}
{{- if gt (int $c.workerThreads) 0 }}
{{- $_ := set $cfg "worker_threads" (int $c.workerThreads) }}
{{- end }}
{{- if $c.ncclLibrary }}
{{- $_ := set $cfg "nccl_library" $c.ncclLibrary }}
{{- end }}
{{- if .spec.labels }}
{{- $_ := set $cfg "labels" .spec.labels }}
{{- end }}
{{- $tls := $v.etcd.external.tls }}
{{- if and $v.etcd.external.endpoints $tls.enabled }}
{{- $_ := set $cfg "etcd_ca" (printf "%s/ca.crt" $paths.etcdTls) }}
{{- if $tls.certKey }}
{{- $_ := set $cfg "etcd_cert" (printf "%s/tls.crt" $paths.etcdTls) }}
{{- $_ := set $cfg "etcd_key" (printf "%s/tls.key" $paths.etcdTls) }}
{{- end }}
{{- end }}
{{- if and $v.etcd.external.endpoints $v.etcd.external.auth.user }}
{{- $_ := set $cfg "etcd_user" $v.etcd.external.auth.user }}
{{- end }}
{{- $cfg = mustMergeOverwrite $cfg (deepCopy $c.extra) }}
{{- toYaml $cfg }}
{{- end }}

{{/* The soft anti-affinity that spreads one component's pods over nodes. */}}
{{- define "ferry.softAntiAffinity" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- toYaml .labels | nindent 12 }}
{{- end }}

{{/* The restricted Pod Security Standard, pod level. */}}
{{- define "ferry.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
fsGroup: {{ .Values.podSecurityContext.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The restricted Pod Security Standard, container level. */}}
{{- define "ferry.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
The pod template of a ferryd node. Call with
(dict "root" $ "role" "worker"|"teacher" "spec" .Values.workers|.Values.teachers "component" "worker"|"teacher" "daemonSet" bool).
*/}}
{{- define "ferry.nodePodTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $spec := .spec }}
{{- $paths := include "ferry.paths" $root | fromYaml }}
{{- $componentLabels := merge (dict "app.kubernetes.io/component" .component) (include "ferry.selectorLabels" $root | fromYaml) }}
{{- $external := $v.etcd.external }}
metadata:
  labels:
    {{- include "ferry.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with $spec.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "ferry.ferrydConfig" (dict "root" $root "role" .role "spec" $spec) | sha256sum }}
    {{- with $spec.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "ferry.serviceAccountName" $root }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ $spec.terminationGracePeriodSeconds }}
  securityContext:
    {{- include "ferry.podSecurityContext" $root | nindent 4 }}
  {{- with $spec.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $spec.affinity }}
  affinity:
    {{- toYaml $spec.affinity | nindent 4 }}
  {{- else if not .daemonSet }}
  affinity:
    {{- include "ferry.softAntiAffinity" (dict "labels" $componentLabels) | nindent 4 }}
  {{- end }}
  containers:
    - name: ferryd
      image: {{ include "ferry.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      command:
        - ferryd
      args:
        - --config
        - {{ $paths.configFile }}
      env:
        - name: FERRY_NODE_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: FERRY_DATA_PLANE_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: FERRY_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ include "ferry.authSecretName" $root }}
              key: {{ include "ferry.authSecretKey" $root }}
        {{- if and $external.endpoints $external.auth.user }}
        - name: FERRY_ETCD_PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ required "etcd.external.auth.existingSecret is required with etcd.external.auth.user" $external.auth.existingSecret }}
              key: {{ $external.auth.passwordKey }}
        {{- end }}
        - name: FERRY_LOG
          value: {{ $v.config.logLevel | quote }}
        {{- with $spec.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: http
          containerPort: {{ $v.api.port }}
          protocol: TCP
      startupProbe:
        httpGet:
          path: /healthz
          port: http
        periodSeconds: 5
        failureThreshold: 60
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 6
      readinessProbe:
        httpGet:
          path: /readyz
          port: http
        periodSeconds: 5
        timeoutSeconds: 3
        failureThreshold: 3
      {{- $resources := deepCopy ($spec.resources | default dict) }}
      {{- if gt (int $spec.gpus) 0 }}
      {{- $limits := get $resources "limits" | default dict }}
      {{- $_ := set $limits $spec.gpuResource (int $spec.gpus) }}
      {{- $_ := set $resources "limits" $limits }}
      {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "ferry.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: {{ $paths.config }}
          readOnly: true
        - name: state
          mountPath: {{ $paths.state }}
        - name: outputs
          mountPath: {{ $paths.outputs }}
        - name: {{ ternary "data" "outputs" (not (empty $v.storage.data.existingClaim)) }}
          mountPath: {{ $paths.data }}
          readOnly: true
          {{- with $v.storage.data.subPath }}
          subPath: {{ . }}
          {{- end }}
        - name: {{ ternary "models" "outputs" (not (empty $v.storage.models.existingClaim)) }}
          mountPath: {{ $paths.models }}
          readOnly: true
          {{- with $v.storage.models.subPath }}
          subPath: {{ . }}
          {{- end }}
        - name: shm
          mountPath: /dev/shm
        - name: tmp
          mountPath: /tmp
        {{- if and $external.endpoints $external.tls.enabled }}
        - name: etcd-tls
          mountPath: {{ $paths.etcdTls }}
          readOnly: true
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "ferry.fullname" $root }}-config
        items:
          - key: {{ .role }}.yaml
            path: ferryd.yaml
    {{- if not (and $v.storage.state.persistent (not .daemonSet)) }}
    - name: state
      {{- if $v.storage.state.sizeLimit }}
      emptyDir:
        sizeLimit: {{ $v.storage.state.sizeLimit }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- end }}
    - name: outputs
      persistentVolumeClaim:
        claimName: {{ include "ferry.outputsClaim" $root }}
    {{- with $v.storage.data.existingClaim }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ . }}
        readOnly: true
    {{- end }}
    {{- with $v.storage.models.existingClaim }}
    - name: models
      persistentVolumeClaim:
        claimName: {{ . }}
        readOnly: true
    {{- end }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $spec.shmSize }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ $spec.tmpSize }}
    {{- if and $external.endpoints $external.tls.enabled }}
    - name: etcd-tls
      secret:
        secretName: {{ required "etcd.external.tls.existingSecret is required with etcd.external.tls.enabled" $external.tls.existingSecret }}
        defaultMode: 288  # 0440: readable by the fsGroup
        items:
          - key: {{ $external.tls.caKey }}
            path: ca.crt
          {{- if $external.tls.certKey }}
          - key: {{ $external.tls.certKey }}
            path: tls.crt
          - key: {{ $external.tls.keyKey }}
            path: tls.key
          {{- end }}
    {{- end }}
{{- end }}

{{/* The state volume claim template of a StatefulSet of ferryd nodes. */}}
{{- define "ferry.stateClaimTemplates" -}}
{{- if .Values.storage.state.persistent }}
volumeClaimTemplates:
  - metadata:
      name: state
      labels:
        {{- include "ferry.labels" . | nindent 8 }}
    spec:
      accessModes:
        - ReadWriteOnce
      {{- with .Values.storage.state.storageClass }}
      storageClassName: {{ . }}
      {{- end }}
      resources:
        requests:
          storage: {{ .Values.storage.state.size }}
{{- end }}
{{- end }}

{{/* Fails when the monitoring.coreos.com/v1 API is missing (unless told to skip the check). */}}
{{- define "ferry.requireMonitoringApi" -}}
{{- if not (or .root.Values.monitoring.skipCapabilityCheck (.root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) }}
{{- fail (printf "%s needs the Prometheus Operator's CRDs (monitoring.coreos.com/v1), which this cluster does not serve: install the operator (or kube-prometheus-stack) first, or disable it. For an offline render (helm template), set monitoring.skipCapabilityCheck=true." .what) }}
{{- end }}
{{- end }}
