{{/*
The pod template shared by the StatefulSet (SQLite) and the Deployment (PostgreSQL).

/data: the PVC "data" (SQLite) or an emptyDir (PostgreSQL). When relayKey.existingSecret
is set, its key is mounted read-only over /data/relay.key (subPath), where the relay
reads its Ed25519 key; the relay creates the key itself only when the file is absent.
With PostgreSQL the same Secret's rotation file (relayKey.rotationFileKey) is mounted over
/data/relay-keys.json too: every replica must see the same keys, current and retired, and
the database refuses a replica whose key is neither the recorded one nor its rotation.
*/}}
{{- define "tetherless.podTemplate" -}}
{{- $postgresql := include "tetherless.postgresql" . -}}
{{- $grace := int .Values.terminationGracePeriodSeconds -}}
{{- if le $grace (add .Values.preStopSleepSeconds .Values.relay.drainTimeoutSeconds | int) -}}
{{- fail "terminationGracePeriodSeconds must exceed preStopSleepSeconds + relay.drainTimeoutSeconds, or the kubelet kills the relay mid-drain" -}}
{{- end -}}
metadata:
  annotations:
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  labels:
    {{- include "tetherless.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "tetherless.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ $grace }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: relay
      image: {{ include "tetherless.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["serve"]
      ports:
        - name: http
          containerPort: {{ .Values.containerPort }}
          protocol: TCP
        {{- if gt (int .Values.metrics.port) 0 }}
        - name: metrics
          containerPort: {{ .Values.metrics.port }}
          protocol: TCP
        {{- end }}
      envFrom:
        - configMapRef:
            name: {{ include "tetherless.fullname" . }}
      {{- $s3 := eq .Values.blobs.storage "s3" }}
      {{- if or $postgresql $s3 .Values.extraEnv }}
      env:
        {{- if $postgresql }}
        - name: TETHERLESS_DATABASE
          valueFrom:
            secretKeyRef:
              name: {{ .Values.database.existingSecret }}
              key: {{ .Values.database.existingSecretKey }}
        {{- end }}
        {{- if $s3 }}
        {{- $secret := required "blobs.s3.existingSecret is required with blobs.storage=s3" .Values.blobs.s3.existingSecret }}
        - name: AWS_ACCESS_KEY_ID
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: {{ .Values.blobs.s3.accessKeyIdKey }}
        - name: AWS_SECRET_ACCESS_KEY
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: {{ .Values.blobs.s3.secretAccessKeyKey }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      startupProbe:
        httpGet:
          path: /livez
          port: http
        periodSeconds: {{ .Values.probes.startup.periodSeconds }}
        timeoutSeconds: {{ .Values.probes.startup.timeoutSeconds }}
        failureThreshold: {{ .Values.probes.startup.failureThreshold }}
      livenessProbe:
        httpGet:
          path: /livez
          port: http
        periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
        timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
        failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: http
        periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
        timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
        failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
      {{- if gt (int .Values.preStopSleepSeconds) 0 }}
      lifecycle:
        preStop:
          exec:
            command: ["sleep", {{ .Values.preStopSleepSeconds | toString | quote }}]
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: /data
        - name: tmp
          mountPath: /tmp
        {{- if .Values.relayKey.existingSecret }}
        - name: relay-key
          mountPath: /data/relay.key
          subPath: relay.key
          readOnly: true
        {{- if $postgresql }}
        - name: relay-key
          mountPath: /data/relay-keys.json
          subPath: relay-keys.json
          readOnly: true
        {{- end }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.tmpSizeLimit }}
    {{- if or $postgresql (not .Values.persistence.enabled) }}
    - name: data
      emptyDir: {}
    {{- end }}
    {{- if .Values.relayKey.existingSecret }}
    - name: relay-key
      secret:
        secretName: {{ .Values.relayKey.existingSecret }}
        defaultMode: 0440
        items:
          - key: {{ .Values.relayKey.existingSecretKey }}
            path: relay.key
          {{- if $postgresql }}
          - key: {{ .Values.relayKey.rotationFileKey }}
            path: relay-keys.json
          {{- end }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
