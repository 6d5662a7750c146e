-- Release the claims of instances, idempotently, and either remove them or set a new state.
-- KEYS: 1 gpu_used, 2 ram_used, 3 claims, 4 inst, 5 inst_state, 6 inst_reason, 7 inst_worker,
--       8 model_index_prefix (the model's set is <prefix><model>), 9 cpu_used, 10 committed_by, 11 the call's
--       replay key (shared/state/replay.py: a replay answers what the first run did)
-- ARGV: mode ("remove" | "remove_pending" | state name), then instance ids.
-- Returns the number of instances whose claims were released; "remove_pending" instead removes only the ids still
-- PENDING (a scale-down racing a commit: one placed meanwhile stays, to be drained) and returns those ids.
local memo = replayed()
if memo ~= nil then return memo end
local released = 0
local removed = {}
local only_pending = ARGV[1] == "remove_pending"
for i = 2, #ARGV do
  local id = ARGV[i]
  if not only_pending or redis.call("HGET", KEYS[5], id) == "PENDING" then
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
    if ARGV[1] == "remove" or only_pending then
      removed[#removed + 1] = id
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
end
if only_pending then
  if #removed > 0 then return remember(removed) end
  return removed
end
if released > 0 or #removed > 0 then return remember(released) end
return released
