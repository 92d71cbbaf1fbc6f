{{/* Names, labels and the values every template shares. */}}

{{- define "fedkube.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fedkube.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "fedkube.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "fedkube.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fedkube.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedkube.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fedkube.labels" -}}
{{ include "fedkube.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedkube
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "fedkube.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "fedkube.slimImage" -}}
{{- printf "%s:%s" .Values.image.slimRepository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "fedkube.operatorName" -}}
{{- printf "%s-operator" (include "fedkube.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fedkube.redisName" -}}
{{- printf "%s-redis" (include "fedkube.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* True ("true") when this release runs its own Redis. */}}
{{- define "fedkube.redisBundled" -}}
{{- if and (eq .Values.mode "central") .Values.redis.bundled -}}true{{- end -}}
{{- end -}}

{{/* The Redis URL the operator and the job's aggregator tier use (no password in it). */}}
{{- define "fedkube.redisUrl" -}}
{{- if include "fedkube.redisBundled" . -}}
{{- printf "redis://%s.%s.svc.cluster.local:6379/0" (include "fedkube.redisName" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the Redis password, or nothing. */}}
{{- define "fedkube.redisSecret" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecret -}}
{{- else if include "fedkube.redisBundled" . -}}
{{- include "fedkube.redisName" . -}}
{{- end -}}
{{- end -}}

{{/* What values.schema.json cannot say: rules across fields. */}}
{{- define "fedkube.validate" -}}
{{- if and (eq .Values.mode "central") (not .Values.redis.bundled) (not .Values.redis.url) -}}
{{- fail "redis.url: mode central without the bundled Redis (redis.bundled=false) needs redis.url" -}}
{{- end -}}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.leaderElection.enabled) -}}
{{- fail "operator.replicas: more than one replica needs operator.leaderElection.enabled=true (two operators would fight over the same pods)" -}}
{{- end -}}
{{- end -}}
