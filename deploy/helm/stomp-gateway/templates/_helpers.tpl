{{/* Chart name. */}}
{{- define "stomp-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "stomp-gateway.fullname" -}}
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

{{- define "stomp-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stomp-gateway.labels" -}}
helm.sh/chart: {{ include "stomp-gateway.chart" . }}
{{ include "stomp-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stomp-gateway
{{- end }}

{{- define "stomp-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stomp-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "stomp-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stomp-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "stomp-gateway.secretName" -}}
{{- default (include "stomp-gateway.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/*
The gateway configuration as TOML. Listener addresses come from the service
ports. Helm reads every YAML number as a float, and toToml writes 20000 as
20000.0, which the gateway's integer keys and RabbitMQ's x-arguments refuse:
whole numbers are written back as integers.
*/}}
{{- define "stomp-gateway.configToml" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $server := default dict $cfg.server }}
{{- $_ := set $server "listen" (printf "0.0.0.0:%d" (int .Values.service.port)) }}
{{- $_ := set $server "admin_listen" (printf "0.0.0.0:%d" (int .Values.admin.port)) }}
{{- $_ := set $cfg "server" $server }}
{{- $toml := toToml $cfg }}
{{- regexReplaceAll "(?m)(= -?[0-9]+)\\.0$" $toml "${1}" }}
{{- end }}

{{/* Drain period in whole seconds, rounded up. */}}
{{- define "stomp-gateway.drainSeconds" -}}
{{- $ms := int (default 20000 (dig "server" "drain_period_ms" 20000 .Values.config)) }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{/* preStop sleep + drain period + margin, unless set explicitly. */}}
{{- define "stomp-gateway.terminationGracePeriodSeconds" -}}
{{- if .Values.lifecycle.terminationGracePeriodSeconds }}
{{- int .Values.lifecycle.terminationGracePeriodSeconds }}
{{- else }}
{{- add (int .Values.lifecycle.preStopSleepSeconds) (int (include "stomp-gateway.drainSeconds" .)) (int .Values.lifecycle.drainMarginSeconds) }}
{{- end }}
{{- end }}
