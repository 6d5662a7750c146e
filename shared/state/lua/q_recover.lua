-- Recover the requests of a node whose heartbeat expired (or of this node itself after a restart, "force"):
-- its in-flight requests lose their lease (late results from it are refused) and go to the head of the
-- recoverer's list; its queued requests move to the recoverer's tail, in order. At most max_n per call;
-- when nothing is left the dead node leaves the node and load tables.
-- KEYS: 1 nodes (heartbeat times), 2 dead list, 3 dead in-flight set, 4 dead load table, 5 own list,
--       6 own load table, 7 leases, 8 the call's replay key
-- ARGV: dead node, recovering node, now, expire_s, max_n, force (0/1)
-- Returns {moved, 1 when the dead node is fully recovered}, or {-1, 0} when the node is alive. The last key names
-- the call (shared/state/replay.py): a replay answers the first run's reply (run again, it would move the next
-- chunk and the count of the first would be lost).
local memo = replayed()
if memo ~= nil then return memo end  -- a replay of this very call (shared/state/replay.py)
local dead, me, now, expire, max_n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if ARGV[6] ~= "1" then
  local seen = redis.call("ZSCORE", KEYS[1], dead)
  if seen and tonumber(seen) > now - expire then return {-1, 0} end
end
local moved = 0
local flying = redis.call("SRANDMEMBER", KEYS[3], max_n)
for _, id in ipairs(flying) do
  redis.call("SREM", KEYS[3], id)
  if redis.call("HGET", KEYS[7], id) == dead then
    redis.call("HDEL", KEYS[7], id)
    redis.call("LPUSH", KEYS[5], id)
    moved = moved + 1
  end
end
local queued = 0
if moved < max_n and ARGV[6] ~= "1" then
  local ids = redis.call("LRANGE", KEYS[2], 0, max_n - moved - 1)
  if #ids > 0 then
    redis.call("LTRIM", KEYS[2], #ids, -1)
    redis.call("RPUSH", KEYS[5], unpack(ids))
    queued = #ids
    if tonumber(redis.call("ZINCRBY", KEYS[4], -queued, dead)) <= 0 then redis.call("ZREM", KEYS[4], dead) end
  end
end
moved = moved + queued
if moved > 0 then redis.call("ZINCRBY", KEYS[6], moved, me) end
local left = redis.call("SCARD", KEYS[3])
if ARGV[6] ~= "1" then left = left + redis.call("LLEN", KEYS[2]) end  -- a restarting node keeps its own queue
if left == 0 and ARGV[6] ~= "1" then
  redis.call("ZREM", KEYS[1], dead)
  redis.call("ZREM", KEYS[4], dead)
end
local reply = {moved, 0}
if left == 0 then reply[2] = 1 end
if moved > 0 then return remember(reply) end
return reply
