-- Cordon or uncordon a worker or one of its GPUs, unless a command at least as new already did: a command whose
-- ack wait ran out is delivered again, possibly in a later batch than a newer one for the same field.
-- KEYS: 1 cordon, 2 cordon_seq. ARGV: field ("worker" or "worker:gpu"), "1" (cordon) or "0" (uncordon), the
-- command's stream sequence, its stream's creation time in microseconds.
-- Newer, as for scale commands (converge_up.lua): a later sequence, the same one again (a redelivery whose ack was
-- lost: nothing changes), or a later stream (a stream deleted and created again restarts its sequence).
-- Returns 1 when applied, 0 when stale.
local last = redis.call("HGET", KEYS[2], ARGV[1])
local seq, at = tonumber(ARGV[3]), tonumber(ARGV[4])
if last then
  local last_seq, last_at = string.match(last, "^(%d+):?(%d*)$")
  if last_seq and tonumber(last_seq) > seq and at <= (tonumber(last_at) or 0) then return 0 end
end
redis.call("HSET", KEYS[2], ARGV[1], ARGV[3] .. ":" .. ARGV[4])
if ARGV[2] == "1" then
  redis.call("HSET", KEYS[1], ARGV[1], "1")
else
  redis.call("HDEL", KEYS[1], ARGV[1])
end
return 1
