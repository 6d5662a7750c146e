-- Forget a worker: inventory, heartbeat, usage, cordons, ledger capacity and model files, in one step.
-- Refused ("alive") if it was heard after the cutoff (it came back), or ("holds") if any of its GPUs or its
-- RAM or CPU still carries claims: capacity never leaves the ledger under a live claim.
-- KEYS: 1 workers, 2 seen, 3 usage, 4 cordon, 5 gpu_cap, 6 gpu_used, 7 ram_cap, 8 ram_used, 9 files,
--       10 cpu_cap, 11 cpu_used, 12 cordon_seq
-- ARGV: worker, cutoff (seen must be <= it; "" skips the check), n GPU fields, the GPU fields, then file fields
-- Returns "ok", "alive" or "holds".
local worker, cutoff, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
if cutoff ~= "" then
  local seen = redis.call("HGET", KEYS[2], worker)
  if seen and tonumber(seen) > tonumber(cutoff) then return "alive" end
end
for i = 4, 3 + n do
  if tonumber(redis.call("HGET", KEYS[6], ARGV[i]) or "0") > 0 then return "holds" end
end
if tonumber(redis.call("HGET", KEYS[8], worker) or "0") > 0 then return "holds" end
if tonumber(redis.call("HGET", KEYS[11], worker) or "0") > 0 then return "holds" end
redis.call("HDEL", KEYS[1], worker)
redis.call("HDEL", KEYS[2], worker)
redis.call("HDEL", KEYS[3], worker)
redis.call("HDEL", KEYS[4], worker)
redis.call("HDEL", KEYS[7], worker)
redis.call("HDEL", KEYS[8], worker)
redis.call("HDEL", KEYS[10], worker)
redis.call("HDEL", KEYS[11], worker)
redis.call("HDEL", KEYS[12], worker)
for i = 4, 3 + n do
  redis.call("HDEL", KEYS[4], ARGV[i])
  redis.call("HDEL", KEYS[12], ARGV[i])
  redis.call("HDEL", KEYS[5], ARGV[i])
  redis.call("HDEL", KEYS[6], ARGV[i])
end
for i = 4 + n, #ARGV do
  redis.call("HDEL", KEYS[9], ARGV[i])
end
return "ok"
