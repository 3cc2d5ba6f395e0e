{{- define "avatar-stack.fullname" -}}
{{- printf "%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "avatar-stack.labels" -}}
app.kubernetes.io/name: avatar-stack
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "avatar-stack.selector" -}}
app.kubernetes.io/name: avatar-stack
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "avatar-stack.secretName" -}}
{{- if .Values.secrets.existingSecret -}}{{ .Values.secrets.existingSecret }}{{- else -}}{{ include "avatar-stack.fullname" . }}-secrets{{- end -}}
{{- end -}}

{{/* Environment shared by every service: the ConfigMap, then the Secret (both optional keys). */}}
{{- define "avatar-stack.envFrom" -}}
- configMapRef:
    name: {{ include "avatar-stack.fullname" . }}-config
{{- if or .Values.secrets.existingSecret .Values.secrets.create }}
- secretRef:
    name: {{ include "avatar-stack.secretName" . }}
{{- end }}
{{- end -}}

{{- define "avatar-stack.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
