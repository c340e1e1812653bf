-- Argo CD health check for VirtualMachine, ISOImage, LibvirtHost, VirtualMachineSnapshot,
-- VirtualMachineRestore and VirtualMachineMigration (virt.libvirt-operator.io).
-- The operator writes kstatus conditions: Ready (positive), Reconciling and Stalled (abnormal-true),
-- each with the generation it describes; status.error has a stable code and a message.
-- Argo CD runs it with gopher-lua (Lua 5.1): nothing newer is used.
local function verdict(state, message)
  return {status = state, message = message}
end

local function condition(status, ctype)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function describe(c, status)
  local msg = ""
  if c ~= nil and c.message ~= nil then
    msg = c.message
  elseif c ~= nil and c.reason ~= nil then
    msg = c.reason
  end
  if status.error ~= nil and status.error.code ~= nil and not string.find(msg, status.error.code, 1, true) then
    msg = "[" .. status.error.code .. "] " .. msg
  end
  return msg
end

local status = obj.status
if status == nil or status.conditions == nil then
  return verdict("Progressing", "Waiting for the operator to report status")
end

local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  return verdict("Progressing", "Waiting for the operator to observe generation " .. generation)
end

local ready = condition(status, "Ready")
local stalled = condition(status, "Stalled")
local reconciling = condition(status, "Reconciling")

if stalled ~= nil and stalled.status == "True" then
  return verdict("Degraded", describe(stalled, status))
end

if obj.kind == "VirtualMachine" then
  if status.printableStatus == "CrashLoopBackOff" or status.printableStatus == "ErrorUnschedulable" then
    return verdict("Degraded", status.printableStatus .. ": " .. describe(ready, status))
  end
  if status.printableStatus == "Paused" and ready ~= nil and ready.status == "True" then
    return verdict("Suspended", "Paused")
  end
end

if ready ~= nil and ready.status == "True" then
  return verdict("Healthy", describe(ready, status))
end

-- Not Ready with an error (e.g. HOST_UNREACHABLE, retried with backoff): Degraded, even while the
-- operator keeps retrying; Reconciling without an error is ordinary progress.
if ready ~= nil and ready.status == "False" and status.error ~= nil and status.error.code ~= nil then
  return verdict("Degraded", describe(ready, status))
end

if reconciling ~= nil and reconciling.status == "True" then
  return verdict("Progressing", describe(reconciling, status))
end

if ready ~= nil and ready.status == "False" then
  return verdict("Degraded", describe(ready, status))
end

return verdict("Progressing", describe(ready, status))
