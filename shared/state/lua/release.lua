-- Release the claims of instances, idempotently, and either remove them or set a new state.
-- KEYS: 1 gpu_used, 2 ram_used, 3 claims, 4 inst, 5 inst_state, 6 inst_reason, 7 inst_worker,
--       8 model_index_prefix (the model's set is <prefix><model>), 9 cpu_used, 10 committed_by
-- ARGV: mode ("remove" | state name), then instance ids.
-- Returns the number of instances whose claims were released.
local released = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local spec = redis.call("HGET", KEYS[3], id)
  if spec then
    for part in string.gmatch(spec, "[^;]+") do
      local kind, field, amount = string.match(part, "^(%a)|(.+)|(%-?%d+)$")
      local usedkey = KEYS[1]
      if kind == "r" then usedkey = KEYS[2] end
      if kind == "c" then usedkey = KEYS[9] end
      redis.call("HINCRBY", usedkey, field, -tonumber(amount))
    end
    redis.call("HDEL", KEYS[3], id)
    redis.call("HDEL", KEYS[10], id)
    released = released + 1
  end
  if ARGV[1] == "remove" then
    local model = model_of(redis.call("HGET", KEYS[4], id))
    if model then
      redis.call("SREM", KEYS[8] .. model, id)
      track(model, id, nil)
    end
    redis.call("HDEL", KEYS[4], id)
    redis.call("HDEL", KEYS[5], id)
    redis.call("HDEL", KEYS[6], id)
    redis.call("HDEL", KEYS[7], id)
  elseif redis.call("HEXISTS", KEYS[5], id) == 1 then
    redis.call("HSET", KEYS[5], id, ARGV[1])
    local model = model_of(redis.call("HGET", KEYS[4], id))
    if model then track(model, id, ARGV[1]) end
  end
end
return released
