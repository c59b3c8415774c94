{{/*
Expand the name of the chart.
*/}}
{{- define "service-slm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "service-slm.fullname" -}}
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
Create chart name and version as used by the chart label.
*/}}
{{- define "service-slm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A component's resource name: fullname-component, within 63 characters.
Call with (dict "root" $ "component" "doorman").
*/}}
{{- define "service-slm.componentName" -}}
{{- printf "%s-%s" (include "service-slm.fullname" .root | trunc (int (sub 62 (len .component)))) .component | trimSuffix "-" }}
{{- end }}

{{/*
Common labels of a component. Call with (dict "root" $ "component" "doorman").
*/}}
{{- define "service-slm.labels" -}}
helm.sh/chart: {{ include "service-slm.chart" .root }}
{{ include "service-slm.selectorLabels" . }}
{{- if .root.Chart.AppVersion }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: {{ include "service-slm.name" .root }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{/*
Selector labels: name + instance only, as `helm create` has them. The name carries the
component so that each Deployment and Service selects its own pods; nothing user-defined
ever enters a selector. Call with (dict "root" $ "component" "doorman").
*/}}
{{- define "service-slm.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-%s" (include "service-slm.name" .root) .component | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "service-slm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "service-slm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
A service-slm image, pinned: the chart's appVersion unless image.tag is set; "latest" is refused.
Call with (dict "root" $ "repository" "doorman" "suffix" "").
*/}}
{{- define "service-slm.image" -}}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag -}}
{{- if eq $tag "latest" }}{{ fail "image.tag must be a pinned version, not latest" }}{{ end -}}
{{- printf "%s/%s:%s%s" .root.Values.image.registry .repository $tag (default "" .suffix) }}
{{- end }}

{{/*
gRPC address of a component's Service, as the config names it: bare Service name and port.
The kubernetes discovery mode qualifies it for gRPC's DNS resolver.
Call with (dict "root" $ "component" "ledger" "port" 50056).
*/}}
{{- define "service-slm.address" -}}
{{- printf "%s:%d" (include "service-slm.componentName" (dict "root" .root "component" .component)) (int .port) }}
{{- end }}

{{/*
A component's Service as a fully qualified host:port, for resolvers that do not search the
pod's DNS domains (Envoy's STRICT_DNS clusters).
*/}}
{{- define "service-slm.fqdnAddress" -}}
{{- printf "%s.%s.svc.%s:%d" (include "service-slm.componentName" (dict "root" .root "component" .component)) .root.Release.Namespace .root.Values.clusterDomain (int .port) }}
{{- end }}

{{/*
Checksum of the mesh config, so pods roll when it changes.
*/}}
{{- define "service-slm.configChecksum" -}}
{{- include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}

{{/*
The Secret and key `helm test` calls the API with: auth.testKeySecret, else the chart's own.
*/}}
{{- define "service-slm.testKeyRef" -}}
{{- if .Values.auth.testKeySecret }}
{{- dict "name" .Values.auth.testKeySecret "key" "api-key" | toJson }}
{{- else if .Values.auth.keys }}
{{- dict "name" (include "service-slm.componentName" (dict "root" . "component" "api-keys")) "key" "key-0" | toJson }}
{{- end }}
{{- end }}
