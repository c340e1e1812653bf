{{/* Chart name. */}}
{{- define "libvirt-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the release name, unless it already contains the chart name. */}}
{{- define "libvirt-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "libvirt-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "libvirt-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "libvirt-operator.labels" -}}
{{ include "libvirt-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "libvirt-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "libvirt-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The leader-election Lease's name. */}}
{{- define "libvirt-operator.leaseName" -}}
{{- default (include "libvirt-operator.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}
