{{- define "fedjob.name" -}}fedjob{{- end -}}

{{- define "fedjob.fullname" -}}
{{- if contains "fedjob" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-fedjob" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "fedjob.labels" -}}
app.kubernetes.io/name: fedjob
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fedjob.selector" -}}
app.kubernetes.io/name: fedjob
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "fedjob.serviceAccount" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "fedjob.fullname" .) .Values.serviceAccount.name }}
{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}
