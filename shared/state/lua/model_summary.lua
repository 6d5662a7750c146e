-- Count a model's active replicas server-side (cheap converge when scaling up).
-- KEYS: 1 model set, 2 inst_state, 3 inst_reason
-- ARGV: active states (comma-separated)
-- Returns {active count, id of every PENDING replica without a reason...}
local active = {}
for s in string.gmatch(ARGV[1], "[^,]+") do active[s] = true end
local n = 0
local out = {0}
for _, id in ipairs(redis.call("SMEMBERS", KEYS[1])) do
  local st = redis.call("HGET", KEYS[2], id)
  if st and active[st] then
    n = n + 1
    if st == "PENDING" and redis.call("HEXISTS", KEYS[3], id) == 0 then
      out[#out + 1] = id
    end
  end
end
out[1] = n
return out
