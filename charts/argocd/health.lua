-- Argo CD health check for celery-operator.dev TaskQueue and WorkerPool (kstatus conditions).
local hs = {}
local status = obj.status
local generation = obj.metadata.generation
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the object"
  return hs
end
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
local found = {}
for _, condition in ipairs(status.conditions or {}) do
  found[condition.type] = condition
end
local function describe(condition)
  local text = condition.reason or condition.type
  if condition.message ~= nil and condition.message ~= "" then
    text = text .. ": " .. condition.message
  end
  return text
end
local stalled, ready, reconciling = found["Stalled"], found["Ready"], found["Reconciling"]
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled)
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
  return hs
end
if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(reconciling)
  return hs
end
if ready ~= nil and ready.status == "False" then
  -- Reasons the operator reports while it is still converging; any other reason needs a human.
  local converging = {
    Creating = true, RollingOut = true, Progressing = true, Reconciling = true,
    Pending = true, ScalingUp = true, WaitingForPods = true,
  }
  if converging[ready.reason] then
    hs.status = "Progressing"
  else
    hs.status = "Degraded"
  end
  hs.message = describe(ready)
  return hs
end
hs.status = "Progressing"
hs.message = "Waiting for the Ready condition"
return hs
