-- Apply a worker's status report to an instance, only if the instance is still on that worker and
-- the transition moves forward (reports may arrive out of order through several consumers; they never
-- resurrect removed instances or undo DRAINING/UNREACHABLE).
-- KEYS: 1 inst_state, 2 inst_worker
-- ARGV: id, worker, new_state
-- Returns the previous state, or "" when the report was ignored.
local rank = {SCHEDULED = 1, STARTING = 2, RUNNING = 3}
local cur = redis.call("HGET", KEYS[1], ARGV[1])
if not cur then return "" end
if redis.call("HGET", KEYS[2], ARGV[1]) ~= ARGV[2] then return "" end
if cur == "DRAINING" or cur == "UNREACHABLE" or cur == "PENDING" then return "" end
local new = ARGV[3]
if cur == new then return "" end
if new ~= "ERROR" and cur ~= "ERROR" then
  local rc, rn = rank[cur], rank[new]
  if rc == nil or rn == nil or rn < rc then return "" end
end
redis.call("HSET", KEYS[1], ARGV[1], new)
return cur
