-- Apply a worker's status report to an instance, only if the instance is still on that worker and
-- the transition is allowed (reports never resurrect removed instances or undo DRAINING/UNREACHABLE).
-- KEYS: 1 inst_state, 2 inst_worker
-- ARGV: id, worker, new_state
-- Returns the previous state, or "" when the report was ignored.
local cur = redis.call("HGET", KEYS[1], ARGV[1])
if not cur then return "" end
if redis.call("HGET", KEYS[2], ARGV[1]) ~= ARGV[2] then return "" end
if cur == "DRAINING" or cur == "UNREACHABLE" or cur == "PENDING" then return "" end
if cur == ARGV[3] then return "" end
redis.call("HSET", KEYS[1], ARGV[1], ARGV[3])
return cur
