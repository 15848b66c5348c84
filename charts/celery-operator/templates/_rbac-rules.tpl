{{/*
Every permission the operator holds, in one place. An e2e test compares these rules with the requests
the operator actually makes, so add a rule here only together with the code that needs it.
*/}}

{{/* Rules in each watched namespace (cluster-wide when watchNamespaces is empty). */}}
{{- define "celery-operator.rbac.watchedNamespaceRules" -}}
# TaskQueue and WorkerPool objects: watched, finalized and annotated by the operator.
- apiGroups: ["celery-operator.dev"]
  resources: ["taskqueues", "workerpools"]
  verbs: ["get", "list", "watch", "patch", "update"]
# Status (kstatus conditions, observedGeneration, probe results) and the WorkerPool scale subresource.
- apiGroups: ["celery-operator.dev"]
  resources: ["taskqueues/status", "workerpools/status", "workerpools/scale"]
  verbs: ["get", "patch", "update"]
# The generated <pool>-worker and <pool>-beat Deployments.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# Worker pods: read for heartbeats/readiness, patched with controller.kubernetes.io/pod-deletion-cost.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch"]
# Broker URLs and management credentials referenced by TaskQueues (urlFrom.secretKeyRef).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
# Events on TaskQueues and WorkerPools (broker safety warnings, scaling decisions, beat conflicts).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Detect an HPA or KEDA ScaledObject targeting a pool's Deployment (ScalerConflict) instead of fighting it.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/* Rules in the release namespace for leader election. */}}
{{- define "celery-operator.rbac.leaderElectionRules" -}}
# A Lease cannot be restricted by name on create; every other verb is limited to the operator's Lease.
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  resourceNames: [{{ include "celery-operator.leaseName" . | quote }}]
  verbs: ["get", "update", "patch"]
{{- end }}
