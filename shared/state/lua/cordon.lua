-- Cordon or uncordon a worker or one of its GPUs, unless a command at least as new already did: a command whose
-- ack wait ran out is delivered again, possibly in a later batch than a newer one for the same field.
-- KEYS: 1 cordon, 2 cordon_seq. ARGV: field ("worker" or "worker:gpu"), "1" (cordon) or "0" (uncordon), the
-- command's stream sequence.
-- Returns 1 when applied (a redelivery of the last applied command applies again: nothing changes), 0 when stale.
local last = redis.call("HGET", KEYS[2], ARGV[1])
local seq = tonumber(ARGV[3])
if last and tonumber(last) > seq then return 0 end
redis.call("HSET", KEYS[2], ARGV[1], ARGV[3])
if ARGV[2] == "1" then
  redis.call("HSET", KEYS[1], ARGV[1], "1")
else
  redis.call("HDEL", KEYS[1], ARGV[1])
end
return 1
