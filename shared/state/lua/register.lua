-- Store worker inventories and their ledger capacity, each worker in one step, never under a live claim.
-- Per worker: refused ("stale") if its stored inventory is not the one the caller checked the change against
-- (another writer stored one in between); refused ("held:<field>") if a GPU whose capacity would leave or
-- change, or the worker's RAM or CPU below what is claimed, carries claims now. Otherwise the inventory, the GPU
-- capacities (those of GPUs that left are removed), the RAM and CPU capacities (a worker reporting no CPU
-- count has none: its CPU claims are never refused) and the seen time are written, and the
-- store's registration revision moves past both its last value and the writer's clock (seen_at) in microseconds
-- (so it keeps growing after a Redis restart that lost the last writes).
-- KEYS: 1 workers, 2 gpu_cap, 3 gpu_used, 4 ram_cap, 5 ram_used, 6 seen, 7 revision, 8 cpu_cap, 9 cpu_used,
--       10 the call's replay key
-- ARGV: seen_at ("" leaves seen alone), then per worker: name, expected stored JSON ("*": any, "-": none),
--       new JSON, RAM total, CPU milli-cores (0: not counted), n GPUs, (field, capacity) * n
-- Returns per worker: the revision stored (a decimal string), "stale" or "held:<field>". The last key names the
-- call (shared/state/replay.py): a replay answers the first run's revisions (run again, a stored inventory checked
-- against the record it replaced would read "stale", and the revision would move again).
local memo = replayed()
if memo ~= nil then return memo end  -- a replay of this very call (shared/state/replay.py)
local seen_at = ARGV[1]
local now_us = 0
if seen_at ~= "" then now_us = math.floor(tonumber(seen_at) * 1000000) end
local pos = 2
local out, stored = {}, false
while pos <= #ARGV do
  local name, expect, record, ram_total = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2], ARGV[pos + 3]
  local cpu_total = tonumber(ARGV[pos + 4])
  local n = tonumber(ARGV[pos + 5])
  local first = pos + 6
  pos = first + 2 * n
  local cur = redis.call("HGET", KEYS[1], name)
  local verdict = nil
  if expect ~= "*" and (cur or "-") ~= expect then
    verdict = "stale"
  end
  local keep = {}
  for c = 0, n - 1 do
    keep[ARGV[first + 2 * c]] = ARGV[first + 2 * c + 1]
  end
  local gone = {}
  if verdict == nil and cur then
    local ok, old = pcall(cjson.decode, cur)
    if ok and type(old) == "table" and type(old.gpus) == "table" then
      for _, g in ipairs(old.gpus) do
        local field = name .. ":" .. string.format("%d", g.index)
        if keep[field] == nil then gone[#gone + 1] = field end
      end
    end
  end
  if verdict == nil then
    for _, field in ipairs(gone) do
      if tonumber(redis.call("HGET", KEYS[3], field) or "0") > 0 then verdict = "held:" .. field break end
    end
  end
  if verdict == nil then
    for c = 0, n - 1 do
      local field, cap = ARGV[first + 2 * c], ARGV[first + 2 * c + 1]
      local before = redis.call("HGET", KEYS[2], field)
      if before and before ~= cap and tonumber(redis.call("HGET", KEYS[3], field) or "0") > 0 then
        verdict = "held:" .. field
        break
      end
    end
  end
  if verdict == nil and tonumber(ram_total) < tonumber(redis.call("HGET", KEYS[5], name) or "0") then
    verdict = "held:" .. name
  end
  if verdict == nil and cpu_total > 0 and cpu_total < tonumber(redis.call("HGET", KEYS[9], name) or "0") then
    verdict = "held:cpu:" .. name
  end
  if verdict == nil then
    redis.call("HSET", KEYS[1], name, record)
    for _, field in ipairs(gone) do
      redis.call("HDEL", KEYS[2], field)
      redis.call("HDEL", KEYS[3], field)
    end
    for c = 0, n - 1 do
      redis.call("HSET", KEYS[2], ARGV[first + 2 * c], ARGV[first + 2 * c + 1])
    end
    redis.call("HSET", KEYS[4], name, ram_total)
    if cpu_total > 0 then redis.call("HSET", KEYS[8], name, cpu_total) else redis.call("HDEL", KEYS[8], name) end
    if seen_at ~= "" then redis.call("HSET", KEYS[6], name, seen_at) end
    local rev = math.max(now_us, tonumber(redis.call("GET", KEYS[7]) or "0") + 1)
    verdict = string.format("%.0f", rev)
    redis.call("SET", KEYS[7], verdict)
    stored = true
  end
  out[#out + 1] = verdict
end
if stored then return remember(out) end
return out
