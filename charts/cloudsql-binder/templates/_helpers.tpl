{{/* The chart's name. */}}
{{- define "cloudsql-binder.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: every object's name (and the cluster-scoped ones' prefix). */}}
{{- define "cloudsql-binder.fullname" -}}
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

{{- define "cloudsql-binder.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cloudsql-binder.labels" -}}
helm.sh/chart: {{ include "cloudsql-binder.chart" . }}
{{ include "cloudsql-binder.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cloudsql-binder
{{- end }}

{{- define "cloudsql-binder.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cloudsql-binder.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "cloudsql-binder.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cloudsql-binder.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The webhook configurations (cluster-scoped) and the TLS Secret the operator keeps. */}}
{{- define "cloudsql-binder.webhookName" -}}
{{- include "cloudsql-binder.fullname" . }}
{{- end }}

{{- define "cloudsql-binder.webhookTlsSecret" -}}
{{- default (printf "%s-webhook-tls" (include "cloudsql-binder.fullname" .)) .Values.webhook.tlsSecretName }}
{{- end }}

{{- define "cloudsql-binder.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The operator's admission-server arguments. */}}
{{- define "cloudsql-binder.webhookArgs" -}}
{{- if .Values.webhook.enabled }}
- --webhook-listen=0.0.0.0:{{ .Values.webhook.port }}
{{- end }}
{{- end }}

{{/* Where the API server sends admission requests: the chart's Service. */}}
{{- define "cloudsql-binder.webhookClientConfig" -}}
service:
  name: {{ include "cloudsql-binder.fullname" .root }}
  namespace: {{ .root.Release.Namespace }}
  path: {{ .path }}
  port: 443
{{- end }}

{{/* Namespaces the webhooks never see: kube-system, the operator's own, and webhook.excludeNamespaces. */}}
{{- define "cloudsql-binder.webhookNamespaceSelector" -}}
matchExpressions:
  - key: kubernetes.io/metadata.name
    operator: NotIn
    values:
      - kube-system
      - {{ .Release.Namespace }}
      {{- range .Values.webhook.excludeNamespaces }}
      - {{ . }}
      {{- end }}
{{- end }}
