{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "tetherless.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: release name, plus the chart name unless the release name already contains it.
*/}}
{{- define "tetherless.fullname" -}}
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

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "tetherless.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "tetherless.labels" -}}
helm.sh/chart: {{ include "tetherless.chart" . }}
{{ include "tetherless.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: relay
app.kubernetes.io/part-of: tetherless
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels: immutable on StatefulSets and Deployments, so never add to them.
*/}}
{{- define "tetherless.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tetherless.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tetherless.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tetherless.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tetherless.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
"true" when replicas share PostgreSQL, "" for SQLite (use with `if`).
*/}}
{{- define "tetherless.postgresql" -}}
{{- if eq .Values.database.engine "postgresql" }}true{{ end }}
{{- end }}

{{/*
The relay name, required: it is baked into every address the relay hands out.
*/}}
{{- define "tetherless.relayName" -}}
{{- required "relay.name is required: the public DNS name of the relay (part of every device address)" .Values.relay.name }}
{{- end }}

{{/*
A setting as an environment value. YAML numbers reach templates as float64, and Go would
print 16777216 as 1.6777216e+07, which the relay cannot parse as an integer: print whole
numbers as integers.
*/}}
{{- define "tetherless.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}
