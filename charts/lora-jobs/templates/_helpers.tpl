{{/*
The chart name, cut to 63 characters (the DNS label limit of names and label values).
*/}}
{{- define "lora-jobs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name: the release name, plus the chart name unless
the release name already contains it; cut to 63 characters.
*/}}
{{- define "lora-jobs.fullname" -}}
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
"<fullname>-<suffix>", with the prefix cut so the whole stays within 63 characters.
Usage: include "lora-jobs.componentName" (list . "minio")
*/}}
{{- define "lora-jobs.componentName" -}}
{{- $ctx := index . 0 }}
{{- $suffix := index . 1 }}
{{- $prefix := include "lora-jobs.fullname" $ctx | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $prefix $suffix }}
{{- end }}

{{- define "lora-jobs.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every chart-made object. Selector labels are the immutable subset that
Deployments and Services select on; the rest may change between releases.
*/}}
{{- define "lora-jobs.labels" -}}
helm.sh/chart: {{ include "lora-jobs.chart" . }}
{{ include "lora-jobs.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "lora-jobs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lora-jobs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* ServiceAccount names. */}}
{{- define "lora-jobs.launcherServiceAccount" -}}
{{- default (include "lora-jobs.componentName" (list . "launcher")) .Values.launcher.serviceAccount.name }}
{{- end }}

{{- define "lora-jobs.trainerServiceAccount" -}}
{{- default (include "lora-jobs.componentName" (list . "trainer")) .Values.trainer.serviceAccount.name }}
{{- end }}

{{/* Images: "<repository>:<tag or appVersion>". */}}
{{- define "lora-jobs.trainerImage" -}}
{{- printf "%s:%s" .Values.images.trainer.repository (default .Chart.AppVersion .Values.images.trainer.tag) }}
{{- end }}

{{- define "lora-jobs.launcherImage" -}}
{{- printf "%s:%s" .Values.images.launcher.repository (default .Chart.AppVersion .Values.images.launcher.tag) }}
{{- end }}

{{/* The S3 credentials Secret that jobs, hooks and tests read. */}}
{{- define "lora-jobs.s3SecretName" -}}
{{- default (include "lora-jobs.componentName" (list . "s3")) .Values.s3.existingSecret }}
{{- end }}

{{/* Whether the chart makes that Secret: no existingSecret, and keys given or dev MinIO on. */}}
{{- define "lora-jobs.createS3Secret" -}}
{{- if and (not .Values.s3.existingSecret) (or .Values.s3.credentials.accessKeyId .Values.minio.enabled) }}true{{ end }}
{{- end }}

{{- define "lora-jobs.minioName" -}}
{{- include "lora-jobs.componentName" (list . "minio") }}
{{- end }}

{{/* The dev MinIO's root credentials: only MinIO itself and its setup hook read them. */}}
{{- define "lora-jobs.minioRootSecretName" -}}
{{- include "lora-jobs.componentName" (list . "minio-root") }}
{{- end }}

{{/* The buckets the dev MinIO creates, which are all the training user may touch. */}}
{{- define "lora-jobs.minioBuckets" -}}
{{- toJson (uniq (prepend .Values.minio.extraBuckets .Values.s3.bucket)) }}
{{- end }}

{{/*
The MinIO policy of the training user: list and read/write objects in the chart's
buckets, nothing else (no other bucket, no bucket creation or deletion, no admin).
Delete is granted because the trainer removes its own checkpoints (jobs/storage.py).
*/}}
{{- define "lora-jobs.minioTrainingPolicy" -}}
{{- $buckets := include "lora-jobs.minioBuckets" . | fromJsonArray }}
{{- $bucketArns := list }}
{{- $objectArns := list }}
{{- range $buckets }}
{{- $bucketArns = append $bucketArns (printf "arn:aws:s3:::%s" .) }}
{{- $objectArns = append $objectArns (printf "arn:aws:s3:::%s/*" .) }}
{{- end }}
{{- $statements := list
  (dict "Effect" "Allow" "Action" (list "s3:GetBucketLocation" "s3:ListBucket" "s3:ListBucketMultipartUploads") "Resource" $bucketArns)
  (dict "Effect" "Allow" "Action" (list "s3:GetObject" "s3:PutObject" "s3:DeleteObject" "s3:AbortMultipartUpload" "s3:ListMultipartUploadParts") "Resource" $objectArns) }}
{{- toPrettyJson (dict "Version" "2012-10-17" "Statement" $statements) }}
{{- end }}

{{/* Selector of the training pods that launcher/render.py labels (run_labels). */}}
{{- define "lora-jobs.trainingPodLabels" -}}
app.kubernetes.io/name: lora-jobs
app.kubernetes.io/component: training
{{- end }}

{{/*
Egress of every pod that talks to S3 (training pods, the bucket hook, the helm test):
DNS in kube-system, the dev MinIO's pods, and networkPolicy.s3Egress.
*/}}
{{- define "lora-jobs.s3EgressRules" -}}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: kube-system
  ports:
    - protocol: UDP
      port: 53
    - protocol: TCP
      port: 53
{{- if .Values.minio.enabled }}
- to:
    - podSelector:
        matchLabels:
          {{- include "lora-jobs.selectorLabels" . | nindent 10 }}
          app.kubernetes.io/component: minio
  ports:
    - protocol: TCP
      port: {{ int .Values.minio.port }}
{{- end }}
{{- range .Values.networkPolicy.s3Egress }}
- to:
    - ipBlock:
        cidr: {{ .cidr }}
        {{- with .except }}
        except:
          {{- toYaml . | nindent 10 }}
        {{- end }}
  ports:
    {{- range .ports }}
    - protocol: TCP
      port: {{ int . }}
    {{- end }}
{{- end }}
{{- with .Values.networkPolicy.extraEgress }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* s3.endpoint, or the development MinIO's Service when it is on. */}}
{{- define "lora-jobs.s3Endpoint" -}}
{{- if .Values.s3.endpoint }}
{{- .Values.s3.endpoint }}
{{- else if .Values.minio.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "lora-jobs.minioName" .) .Release.Namespace (int .Values.minio.port) }}
{{- end }}
{{- end }}

{{/*
The launcher's settings for this namespace (LauncherSettings field names): the body
of ConfigMap lora-jobs-launcher.
*/}}
{{- define "lora-jobs.launcherSettings" -}}
image: {{ include "lora-jobs.trainerImage" . | quote }}
image_pull_policy: {{ .Values.images.trainer.pullPolicy | quote }}
{{- $endpoint := include "lora-jobs.s3Endpoint" . }}
s3_endpoint: {{ if $endpoint }}{{ $endpoint | quote }}{{ else }}null{{ end }}
s3_region: {{ .Values.s3.region | quote }}
s3_secret_name: {{ include "lora-jobs.s3SecretName" . | quote }}
s3_access_key_key: {{ .Values.s3.accessKeyIdKey | quote }}
s3_secret_key_key: {{ .Values.s3.secretAccessKeyKey | quote }}
gpu_resource: {{ .Values.settings.gpuResource | quote }}
node_selector: {{- toYaml .Values.settings.nodeSelector | nindent 2 }}
tolerations: {{- toYaml .Values.settings.tolerations | nindent 2 }}
service_account: {{ include "lora-jobs.trainerServiceAccount" . | quote }}
queue: {{ if .Values.settings.queue }}{{ .Values.settings.queue | quote }}{{ else }}null{{ end }}
multinode_workload: {{ .Values.settings.multinodeWorkload | quote }}
ttl_seconds_after_finished: {{ int .Values.settings.ttlSecondsAfterFinished }}
{{- $priority := .Values.settings.priorityClass }}
{{- if and (not $priority) .Values.priorityClass.create }}
{{- $priority = .Values.priorityClass.name }}
{{- end }}
priority_class: {{ if $priority }}{{ $priority | quote }}{{ else }}null{{ end }}
mlflow_tracking_uri: {{ with .Values.settings.mlflowTrackingUri }}{{ . | quote }}{{ else }}null{{ end }}
mlflow_token_secret: {{ with .Values.settings.mlflowTokenSecret }}{{ . | quote }}{{ else }}null{{ end }}
gpu_prices: {{- with .Values.settings.gpuPrices }}{{ toYaml . | nindent 2 }}{{ else }} {}{{ end }}
model_cache_host_path: {{ with .Values.settings.modelCache.hostPath }}{{ . | quote }}{{ else }}null{{ end }}
model_cache_max_gib: {{ .Values.settings.modelCache.maxGiB }}
{{- end }}

{{/*
The pod and container security context of every chart-made pod: what Pod Security
Admission "restricted" demands, and a read-only root filesystem. The uid/gid is the
images' (docker/*.Dockerfile) and launcher/render.py's RUN_AS: above 10000, so it
collides with no user of the node.
*/}}
{{- define "lora-jobs.uid" -}}10001{{- end }}

{{- define "lora-jobs.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ include "lora-jobs.uid" . }}
runAsGroup: {{ include "lora-jobs.uid" . }}
fsGroup: {{ include "lora-jobs.uid" . }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "lora-jobs.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
The S3 credentials Secret as a volume of two files, access-key-id and
secret-access-key, for the chart's own pods (the helm test, the MinIO hook), which
read files. Training pods get env (secretKeyRef): boto3 reads keys from env or an
INI file, not from two files (see checkov-skips.yaml, CKV_K8S_35).
*/}}
{{- define "lora-jobs.s3CredentialsVolume" -}}
name: s3-credentials
secret:
  secretName: {{ include "lora-jobs.s3SecretName" . }}
  defaultMode: 0440
  items:
    - key: {{ .Values.s3.accessKeyIdKey }}
      path: access-key-id
    - key: {{ .Values.s3.secretAccessKeyKey }}
      path: secret-access-key
{{- end }}

{{/* Env of a pod that talks to S3 as the jobs do (hooks, tests); the keys are files. */}}
{{- define "lora-jobs.s3Env" -}}
- name: S3_CREDENTIALS_DIR
  value: /etc/lora-jobs/s3
{{- with include "lora-jobs.s3Endpoint" . }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
{{- end }}
