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
- --webhook-service={{ .Release.Namespace }}/{{ include "cloudsql-binder.fullname" . }}
- --webhook-service-port=443
- --webhook-configuration-name={{ include "cloudsql-binder.webhookName" . }}
- --webhook-secret-namespace={{ .Release.Namespace }}
- --webhook-secret-name={{ include "cloudsql-binder.webhookTlsSecret" . }}
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

{{/*
The namespaces the webhooks see, exactly as the operator writes them
(src/webhook/configuration.rs): never kube-system nor the release namespace,
only watchNamespaces when set. Both lists sorted: the operator re-applies the
configurations, and identical values keep Helm and it from conflicting.
*/}}
{{- define "cloudsql-binder.webhookNamespaceSelector" -}}
matchExpressions:
  - key: kubernetes.io/metadata.name
    operator: NotIn
    values:
      {{- range (list "kube-system" .Release.Namespace | sortAlpha | uniq) }}
      - {{ . }}
      {{- end }}
  {{- with .Values.watchNamespaces }}
  - key: kubernetes.io/metadata.name
    operator: In
    values:
      {{- range (. | sortAlpha | uniq) }}
      - {{ . }}
      {{- end }}
  {{- end }}
{{- end }}

{{/*
Labels of the webhook configurations: the chart's, except
app.kubernetes.io/managed-by, which the operator sets to cloudsql-binder when
it applies them (Helm adds its own value itself).
*/}}
{{- define "cloudsql-binder.webhookLabels" -}}
helm.sh/chart: {{ include "cloudsql-binder.chart" . }}
{{ include "cloudsql-binder.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: cloudsql-binder
{{- end }}
