-- Apply workers' status reports to instances: each only if the instance is still on the reporting worker
-- and the transition moves forward (reports may arrive out of order through several consumers; they never
-- resurrect removed instances or undo DRAINING/UNREACHABLE).
-- KEYS: 1 inst_state, 2 inst_worker, 3 inst (read only when a report moves an instance out of the active states,
--       or into PENDING: its model's sets follow), 4 the call's replay key
-- ARGV: (id, worker, new_state) per report
-- Returns per report the previous state, or "" when the report was ignored. The last key names the call
-- (shared/state/replay.py): a replay answers the previous states the first run saw (run again, every report it
-- applied would read as ignored and the caller would not announce the change).
local memo = replayed()
if memo ~= nil then return memo end  -- a replay of this very call (shared/state/replay.py)
local rank = {SCHEDULED = 1, STARTING = 2, RUNNING = 3}
local out, changed = {}, false
for i = 1, #ARGV, 3 do
  local id, worker, new = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local cur = redis.call("HGET", KEYS[1], id)
  -- a worker reports only these states (PENDING, DRAINING and UNREACHABLE are the reconciler's to set)
  local ok = cur and (rank[new] ~= nil or new == "ERROR") and redis.call("HGET", KEYS[2], id) == worker
    and cur ~= "DRAINING" and cur ~= "UNREACHABLE" and cur ~= "PENDING" and cur ~= new
  if ok and new ~= "ERROR" and cur ~= "ERROR" then
    local rc, rn = rank[cur], rank[new]
    ok = rc ~= nil and rn ~= nil and rn >= rc
  end
  if ok then
    redis.call("HSET", KEYS[1], id, new)
    if ACTIVE_STATES[cur] ~= ACTIVE_STATES[new] or new == "PENDING" then
      local model = model_of(redis.call("HGET", KEYS[3], id))
      if model then track(model, id, new) end
    end
    out[#out + 1] = cur
    changed = true
  else
    out[#out + 1] = ""
  end
end
if changed then return remember(out) end
return out
