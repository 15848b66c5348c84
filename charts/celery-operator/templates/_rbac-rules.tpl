{{/*
Every permission the operator holds, in one place. An e2e test compares these rules with the requests
the operator actually makes, so add a rule here only together with the code that needs it.
*/}}

{{/* Rules in each watched namespace (cluster-wide when watchNamespaces is empty). */}}
{{- define "celery-operator.rbac.watchedNamespaceRules" -}}
# TaskQueues and WorkerPools, watched once each; the controllers and the autoscaler read the caches.
- apiGroups: ["celery-operator.dev"]
  resources: ["taskqueues"]
  verbs: ["list", "watch"]
- apiGroups: ["celery-operator.dev"]
  resources: ["workerpools"]
  verbs: ["list", "watch"]
# Status: kstatus conditions, observedGeneration, probe results.
- apiGroups: ["celery-operator.dev"]
  resources: ["taskqueues/status", "workerpools/status"]
  verbs: ["patch"]
# The generated <pool>-worker and <pool>-beat Deployments (server-side apply creates them via patch).
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "patch", "delete"]
# Broker URLs and management credentials referenced by TaskQueues (urlFrom.secretKeyRef); only
# metadata is watched.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
# The autoscaler: worker pods are listed and annotated with controller.kubernetes.io/pod-deletion-cost
# before a scale-in (idle workers go first).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "patch"]
# Another autoscaler on the same Deployment (an HPA, or a KEDA ScaledObject where KEDA is installed)
# stops the operator from scaling that pool (ScalingActive=False, ScalerConflict).
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list", "watch"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["list", "watch"]
# Events on TaskQueues and WorkerPools (broker safety warnings, beat conflicts, scale actions);
# repeats are patched.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
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
  verbs: ["get", "patch"]
{{- end }}
