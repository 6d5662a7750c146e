-- Converge several models towards their desired replicas in one atomic step, for the common case:
-- record each model's scale command (unless a later one was applied) and create the missing replicas
-- as PENDING. A model whose converge lock is held by someone else (a scale-down in progress elsewhere; or,
-- when a lock token is given, a lock we no longer hold) is left alone ("busy"); one with more active
-- replicas than desired is reported ("down"): removing replicas takes the locked path.
-- KEYS: 1 desired, 2 desired_seq, 3 models, 4 inst, 5 inst_state, 6 inst_reason, 7 desired_at, then per model:
--       its converge lock, its instance index; last, the call's replay key
-- A model's replicas are counted from its active set (kept by every script that moves a state: the tracking
-- prelude, ACTIVE_PREFIX and its siblings, comes from shared/state/store.py), built at its first converge.
-- Work per call is bounded whatever the counts say: desired replicas above max_replicas are refused before
-- anything is written (a stored one is read as max_replicas), and at most `budget` replicas are created per
-- call over all models; a model left short says so (`more` = 1) and the caller calls again.
-- ARGV: active states (comma-separated), n models, budget, max_replicas, then per model:
--       model, replicas (-1: no scale command), spec_json ("": keep), seq, at (the command's stream sequence and
--       its stream's creation time in microseconds: see `newer` below), id_prefix, id_prefix_json (the
--       prefix as it reads inside a JSON string), record_head, record_tail (a PENDING record is
--       record_head .. id_prefix_json .. counter .. record_tail), lock token ("": the caller holds no lock)
-- Returns per model: {status, applied (0/1), desired, {created ids}, {PENDING ids without a reason}, more (0/1)},
-- all as one JSON string (an empty list reads {}): Redis 6 sends a nested script reply in one socket write per
-- nested table, about three per model; a string goes in one.
-- The last key names the call (shared/state/replay.py): a replay answers the first run's reply (run again, the
-- replicas it created would be counted as there already and reported unrequested, not created).
local memo = replayed()
if memo ~= nil then return memo end  -- a replay of this very call (shared/state/replay.py)
local CHUNK = 1000  -- ids per HMGET: unpack() fails somewhere past 8,000 values
-- Calls visit(id, value) for each of ids with its field of hash `key`, read a chunk at a time.
local function each_field(key, ids, visit)
  for first = 1, #ids, CHUNK do
    local last = math.min(first + CHUNK - 1, #ids)
    local values = redis.call("HMGET", key, unpack(ids, first, last))
    for k = first, last do visit(ids[k], values[k - first + 1]) end
  end
end
-- Whether a command (stream sequence seq, of the stream created at `at` µs) is to be applied over the last applied
-- one: a later sequence, the same one again (a redelivery whose ack was lost: nothing changes), or a later stream. A
-- redelivery behind a newer command has an older sequence of the same stream; a command of a stream deleted and
-- created again (its sequence restarted, Redis kept) a later creation time. (Never the message's own stream time: a
-- clock step or a leader change to a lagging node dates a newer command before an older one.) The sequence stays
-- alone in desired_seq, as releases before the time was kept read and write it; the time is in desired_at as
-- "seq:at", trusted only while its sequence is the one in desired_seq (a previous release's reconciler, in a rolling
-- upgrade, moves the sequence alone). No time known: the sequence alone decides.
local function newer(model, seq, at)
  local last_seq = tonumber(string.match(redis.call("HGET", KEYS[2], model) or "", "^(%d+)") or "")
  if not last_seq or last_seq <= seq then return true end
  local known_seq, known_at = string.match(redis.call("HGET", KEYS[7], model) or "", "^(%d+):(%d+)$")
  return known_seq ~= nil and tonumber(known_seq) == last_seq and at > tonumber(known_at)
end
local active = {}
for s in string.gmatch(ARGV[1], "[^,]+") do active[s] = true end
local models = tonumber(ARGV[2])
local budget, max_replicas = tonumber(ARGV[3]), tonumber(ARGV[4])
local out, wrote = {}, false
local pos = 5
for m = 1, models do  -- validate every model before any write: an error must leave nothing half done
  local replicas = tonumber(ARGV[pos + 1 + 10 * (m - 1)])
  if replicas == nil or replicas > max_replicas or replicas ~= math.floor(replicas) then
    return redis.error_reply("converge_up: replicas out of range for " .. ARGV[pos + 10 * (m - 1)])
  end
end
for m = 1, models do
  local model, replicas, spec, seq = ARGV[pos], tonumber(ARGV[pos + 1]), ARGV[pos + 2], tonumber(ARGV[pos + 3])
  local seq_text, at, order = ARGV[pos + 3], tonumber(ARGV[pos + 4]), ARGV[pos + 3] .. ":" .. ARGV[pos + 4]
  local id_prefix, id_json, head, tail = ARGV[pos + 5], ARGV[pos + 6], ARGV[pos + 7], ARGV[pos + 8]
  local token = ARGV[pos + 9]
  local lock_key, index = KEYS[7 + 2 * m - 1], KEYS[7 + 2 * m]
  pos = pos + 10
  local held = redis.call("GET", lock_key)
  if (token == "" and held) or (token ~= "" and held ~= token) then
    out[m] = {"busy", 0, 0, {}, {}, 0}
  else
    local applied = 0
    if replicas >= 0 then
      if newer(model, seq, at) then
        if spec ~= "" then redis.call("HSET", KEYS[3], model, spec) end
        redis.call("HSET", KEYS[1], model, replicas)
        redis.call("HSET", KEYS[2], model, seq_text)  -- as every release reads it
        redis.call("HSET", KEYS[7], model, order)  -- "seq:at"
        applied = 1
        wrote = true
      end
    end
    local desired = math.min(tonumber(redis.call("HGET", KEYS[1], model) or "0") or 0, max_replicas)
    local count, unrequested = 0, {}
    local active_key, pending_key = ACTIVE_PREFIX .. model, PENDING_PREFIX .. model
    local pending = {}
    if redis.call("HEXISTS", TRACKED, model) == 1 then
      -- The model's active set is its replica count (every script that moves a state keeps it): no read of every
      -- replica's state, whose cost grew with the model. Its PENDING set may hold replicas placed since: checked
      -- here (few: those in flight) and pruned.
      count = redis.call("SCARD", active_key)
      each_field(KEYS[5], redis.call("SMEMBERS", pending_key), function(id, st)
        if st == "PENDING" then
          pending[#pending + 1] = id
        else
          redis.call("SREM", pending_key, id)
        end
      end)
    else
      -- The model's first converge since these sets exist (state stored before them): count by reading every
      -- replica's state once, and build the sets from it.
      redis.call("DEL", active_key, pending_key)
      each_field(KEYS[5], redis.call("SMEMBERS", index), function(id, st)
        if st and active[st] then
          count = count + 1
          track(model, id, st)
          if st == "PENDING" then pending[#pending + 1] = id end
        end
      end)
      redis.call("HSET", TRACKED, model, "1")
    end
    each_field(KEYS[6], pending, function(id, reason)
      if not reason then unrequested[#unrequested + 1] = id end
    end)
    if count > desired then
      out[m] = {"down", applied, desired, {}, unrequested, 0}
    else
      local created = {}
      local counter = 0
      local make = math.min(desired - count, budget)
      budget = budget - make
      for k = 1, make do
        local suffix = string.format("%02x", counter)
        while redis.call("HEXISTS", KEYS[4], id_prefix .. suffix) == 1 do  -- a prefix seen before: never overwrite
          counter = counter + 1
          suffix = string.format("%02x", counter)
        end
        counter = counter + 1
        local id = id_prefix .. suffix
        redis.call("HSET", KEYS[4], id, head .. id_json .. suffix .. tail)
        redis.call("HSET", KEYS[5], id, "PENDING")
        redis.call("SADD", index, id)
        track(model, id, "PENDING")
        created[k] = id
      end
      local more = 0
      if count + make < desired then more = 1 end
      out[m] = {"ok", applied, desired, created, unrequested, more}
      if make > 0 then wrote = true end
    end
  end
end
if wrote then return remember(cjson.encode(out)) end
return cjson.encode(out)
