-- Create PENDING instances of a model, fenced by the model's converge lock token, so a reconciler
-- whose lock expired cannot add replicas behind another's back.
-- KEYS: 1 lock key, 2 model set, 3 inst, 4 inst_state, 5 the call's replay key
-- ARGV: token, model, then (id, record_json) pairs; the last key names the call (shared/state/replay.py): a replay
-- answers the first run's count, never writes the records again (the first run's replicas may have moved on).
local memo = replayed()
if memo ~= nil then return memo end  -- a replay of this very call (shared/state/replay.py)
if redis.call("GET", KEYS[1]) ~= ARGV[1] then return -1 end
local made = 0
for i = 3, #ARGV, 2 do
  redis.call("HSET", KEYS[3], ARGV[i], ARGV[i + 1])
  redis.call("HSET", KEYS[4], ARGV[i], "PENDING")
  redis.call("SADD", KEYS[2], ARGV[i])
  track(ARGV[2], ARGV[i], "PENDING")
  made = made + 1
end
if made > 0 then return remember(made) end
return made
