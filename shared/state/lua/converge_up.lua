-- Converge several models towards their desired replicas in one atomic step, for the common case:
-- record each model's scale command (unless a later one was applied) and create the missing replicas
-- as PENDING. A model whose converge lock is held by someone else (a scale-down in progress elsewhere; or,
-- when a lock token is given, a lock we no longer hold) is left alone ("busy"); one with more active
-- replicas than desired is reported ("down"): removing replicas takes the locked path.
-- KEYS: 1 desired, 2 desired_seq, 3 models, 4 inst, 5 inst_state, 6 inst_reason
-- ARGV: active states (comma-separated), lock key prefix, model index prefix, n models, then per model:
--       model, replicas (-1: no scale command), spec_json ("": keep), seq, id_prefix,
--       record_head, record_tail (a PENDING record is record_head .. id .. record_tail),
--       lock token ("": the caller holds no lock)
-- Returns per model: {status, applied (0/1), desired, {created ids}, {PENDING ids without a reason}}
local CHUNK = 1000  -- ids per HMGET (unpack's stack limit is a few thousand)
local active = {}
for s in string.gmatch(ARGV[1], "[^,]+") do active[s] = true end
local lock_prefix, index_prefix = ARGV[2], ARGV[3]
local n = tonumber(ARGV[4])
local out = {}
local pos = 5
for m = 1, n do
  local model, replicas, spec, seq = ARGV[pos], tonumber(ARGV[pos + 1]), ARGV[pos + 2], tonumber(ARGV[pos + 3])
  local id_prefix, head, tail, token = ARGV[pos + 4], ARGV[pos + 5], ARGV[pos + 6], ARGV[pos + 7]
  pos = pos + 8
  local held = redis.call("GET", lock_prefix .. model)
  if (token == "" and held) or (token ~= "" and held ~= token) then
    out[m] = {"busy", 0, 0, {}, {}}
  else
    local applied = 0
    if replicas >= 0 then
      local last = redis.call("HGET", KEYS[2], model)
      if not last or tonumber(last) <= seq then
        if spec ~= "" then redis.call("HSET", KEYS[3], model, spec) end
        redis.call("HSET", KEYS[1], model, replicas)
        redis.call("HSET", KEYS[2], model, seq)
        applied = 1
      end
    end
    local desired = tonumber(redis.call("HGET", KEYS[1], model) or "0")
    local index = index_prefix .. model
    local count, unrequested = 0, {}
    local ids = redis.call("SMEMBERS", index)
    -- States fetched in chunks (one call per chunk rather than one per replica: a model's converge runs
    -- on every scale command, and its cost grows with the model's replicas).
    for first = 1, #ids, CHUNK do
      local last = math.min(first + CHUNK - 1, #ids)
      local states = redis.call("HMGET", KEYS[5], unpack(ids, first, last))
      for k = first, last do
        local id, st = ids[k], states[k - first + 1]
        if st and active[st] then
          count = count + 1
          if st == "PENDING" and redis.call("HEXISTS", KEYS[6], id) == 0 then
            unrequested[#unrequested + 1] = id
          end
        end
      end
    end
    if count > desired then
      out[m] = {"down", applied, desired, {}, unrequested}
    else
      local created = {}
      local n = 0
      for k = 1, desired - count do
        local id = string.format("%s%02x", id_prefix, n)
        while redis.call("HEXISTS", KEYS[4], id) == 1 do  -- a random prefix seen before: never overwrite
          n = n + 1
          id = string.format("%s%02x", id_prefix, n)
        end
        n = n + 1
        redis.call("HSET", KEYS[4], id, head .. id .. tail)
        redis.call("HSET", KEYS[5], id, "PENDING")
        redis.call("SADD", index, id)
        created[k] = id
      end
      out[m] = {"ok", applied, desired, created, unrequested}
    end
  end
end
return out
