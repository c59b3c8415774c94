{{/*
A gRPC service of the mesh: a Deployment running `slm serve NAME` and a headless Service, so
gRPC's DNS resolver sees every pod and balances round-robin. Probes call grpc.health.v1, which
turns SERVING only once the service is ready (e.g. its models are loaded).
Call with (dict "root" $ "component" "doorman" "serve" "doorman" "spec" .Values.doorman
  "replicas" 2 "autoscaled" false "startupSeconds" 60 "image" "..." "volumes" (list) "mounts" (list)
  "env" (list) "resources" (dict) "nodeSelector" (dict) "tolerations" (list) "recreate" false).
*/}}
{{- define "service-slm.grpcComponent" -}}
{{- $root := .root -}}
{{- $ctx := dict "root" $root "component" .component -}}
{{- $spec := .spec -}}
{{- $period := int $root.Values.probes.periodSeconds -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "service-slm.componentName" $ctx }}
  labels:
    {{- include "service-slm.labels" $ctx | nindent 4 }}
spec:
  {{- if not .autoscaled }}
  replicas: {{ .replicas }}
  {{- end }}
  {{- if .recreate }}
  # One writer at a time (SQLite, a single GPU): never two pods during a rollout.
  strategy:
    type: Recreate
  {{- end }}
  selector:
    matchLabels:
      {{- include "service-slm.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      annotations:
        checksum/config: {{ include "service-slm.configChecksum" $root }}
        {{- with $root.Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      labels:
        {{- include "service-slm.labels" $ctx | nindent 8 }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "service-slm.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $root.Values.serviceAccount.automount }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      # Time to drain: health turns NOT_SERVING, streams finish, then the process exits.
      terminationGracePeriodSeconds: 30
      containers:
        - name: {{ .component }}
          image: {{ .image | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: ["serve", {{ .serve | quote }}]
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          env:
            - name: SLM_CONFIG
              value: /etc/slm/slm.toml
            {{- with .env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $spec.port }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $spec.metricsPort }}
              protocol: TCP
          startupProbe:
            grpc:
              port: {{ $spec.port }}
            periodSeconds: {{ $period }}
            failureThreshold: {{ max 1 (div (add .startupSeconds $period -1) $period) }}
          readinessProbe:
            grpc:
              port: {{ $spec.port }}
            periodSeconds: {{ $period }}
            failureThreshold: 1
          livenessProbe:
            grpc:
              port: {{ $spec.port }}
            periodSeconds: {{ $period }}
            failureThreshold: {{ $root.Values.probes.livenessFailureThreshold }}
          resources:
            {{- toYaml .resources | nindent 12 }}
          volumeMounts:
            - name: config
              mountPath: /etc/slm
              readOnly: true
            - name: tmp
              mountPath: /tmp
            {{- with .mounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: config
          configMap:
            name: {{ include "service-slm.componentName" (dict "root" $root "component" "config") }}
        - name: tmp
          emptyDir: {}
        {{- with .volumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ include "service-slm.componentName" $ctx }}
  labels:
    {{- include "service-slm.labels" $ctx | nindent 4 }}
spec:
  # Headless: clients resolve every ready pod and balance per call, not per connection.
  clusterIP: None
  selector:
    {{- include "service-slm.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $spec.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: metrics
      port: {{ $spec.metricsPort }}
      targetPort: metrics
      protocol: TCP
{{- end }}
