-- Commit a batch of placement decisions. Each item is atomic over all its GPUs (main and
-- subordinates) and the RAM and CPU of every worker it touches: all claims are written or none.
-- KEYS: 1 gpu_cap, 2 gpu_used, 3 ram_cap, 4 ram_used, 5 claims, 6 inst, 7 inst_state,
--       8 inst_reason, 9 inst_worker, 10 cpu_cap, 11 cpu_used, 12 committed_by
-- ARGV: n, call, base, then per item: id, by, worker, record_json, nclaims, (kind, field, amount) * nclaims
--       kind is "g" (GPU VRAM), "r" (worker RAM) or "c" (worker milli-cores); the claims spec is stored for
--       release. A worker without a CPU capacity reports no CPU count: its CPU claims are counted, never refused.
-- Item i of a call is committed as "<call>:<base + i>" (committed_by): a replay of that very call (a client that
-- resends it after losing the connection, not knowing whether it ran) answers "ok" again for the items it
-- committed, with nothing written twice, so its caller acts on the verdict the first run gave. An item whose `by` is
-- not "" is committed as that instead: a caller retrying a commit that failed (its replies all lost) names each item
-- as the failed call did, and the items that call committed answer "ok" again.
-- Returns per item: "ok", "dup" (already committed by another call or item: redelivery), "gone" (no longer PENDING)
-- "full:<field>" (no room: the decision is refused) or "invalid:<field>" (a negative or non-integer amount,
-- which the layers above refuse already, or "invalid:model", a record of another model than the PENDING one:
-- never written to the ledger).
-- true when the stored record names a model and the decision's record another (a stored record that does not
-- decode is left to the layers that report invalid records)
local function other_model(stored, record)
  if not stored then return false end
  local ok, old = pcall(cjson.decode, stored)
  if not ok or type(old) ~= "table" or type(old["model"]) ~= "string" then return false end
  return old["model"] ~= cjson.decode(record)["model"]
end
local n = tonumber(ARGV[1])
local call, base = ARGV[2], tonumber(ARGV[3])
local pos = 4
local out = {}
for i = 1, n do
  local id, by, worker, record = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2], ARGV[pos + 3]
  local nclaims = tonumber(ARGV[pos + 4])
  local first = pos + 5
  pos = first + 3 * nclaims
  local verdict = nil
  if by == "" then by = call .. ":" .. (base + i) end
  if redis.call("HEXISTS", KEYS[5], id) == 1 then
    if redis.call("HGET", KEYS[12], id) == by then verdict = "ok" else verdict = "dup" end
  elseif redis.call("HGET", KEYS[7], id) ~= "PENDING" then
    verdict = "gone"
  elseif other_model(redis.call("HGET", KEYS[6], id), record) then
    verdict = "invalid:model"  -- a decision for another model than the replica's: never written
  else
    for c = 0, nclaims - 1 do
      local kind, field = ARGV[first + 3 * c], ARGV[first + 3 * c + 1]
      local amount = tonumber(ARGV[first + 3 * c + 2])
      local capkey, usedkey = KEYS[1], KEYS[2]
      if kind == "r" then capkey, usedkey = KEYS[3], KEYS[4] end
      if kind == "c" then capkey, usedkey = KEYS[10], KEYS[11] end
      if amount == nil or amount < 0 or amount ~= math.floor(amount) then
        verdict = "invalid:" .. field
        break
      end
      local raw = redis.call("HGET", capkey, field)
      local cap = -1
      if raw then cap = tonumber(raw) elseif kind == "c" then cap = math.huge end
      local used = tonumber(redis.call("HGET", usedkey, field) or "0")
      if cap < 0 or used + amount > cap then
        verdict = "full:" .. field
        break
      end
    end
  end
  if verdict == nil then
    local spec = {}
    for c = 0, nclaims - 1 do
      local kind, field = ARGV[first + 3 * c], ARGV[first + 3 * c + 1]
      local amount = ARGV[first + 3 * c + 2]
      local usedkey = KEYS[2]
      if kind == "r" then usedkey = KEYS[4] end
      if kind == "c" then usedkey = KEYS[11] end
      redis.call("HINCRBY", usedkey, field, amount)
      spec[#spec + 1] = kind .. "|" .. field .. "|" .. amount
    end
    redis.call("HSET", KEYS[5], id, table.concat(spec, ";"))
    redis.call("HSET", KEYS[6], id, record)
    redis.call("HSET", KEYS[7], id, "SCHEDULED")
    redis.call("HSET", KEYS[9], id, worker)
    redis.call("HSET", KEYS[12], id, by)
    redis.call("HDEL", KEYS[8], id)
    verdict = "ok"
  end
  out[i] = verdict
end
return out
