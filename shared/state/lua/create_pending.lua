-- Create PENDING instances of a model, fenced by the model's converge lock token, so a reconciler
-- whose lock expired cannot add replicas behind another's back.
-- KEYS: 1 lock key, 2 model set, 3 inst, 4 inst_state
-- ARGV: token, model, then (id, record_json) pairs
if redis.call("GET", KEYS[1]) ~= ARGV[1] then return -1 end
local made = 0
for i = 3, #ARGV, 2 do
  redis.call("HSET", KEYS[3], ARGV[i], ARGV[i + 1])
  redis.call("HSET", KEYS[4], ARGV[i], "PENDING")
  redis.call("SADD", KEYS[2], ARGV[i])
  track(ARGV[2], ARGV[i], "PENDING")
  made = made + 1
end
return made
