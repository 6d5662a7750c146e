-- Queue requests on a node's list (global broker). An id already held (queued or being served) or finished
-- within the TTL is refused. Also forgets finished ids older than the TTL, at most 100 per call or twice as many as
-- it queues, whichever is more (100 alone fell behind puts of 500: the set grew without bound).
-- A node that queues without ever having sent a heartbeat is entered in the node table (NX), so that its
-- queue is recovered if it dies before its first heartbeat.
-- KEYS: 1 own request list, 2 bodies, 3 done, 4 own load table, 5 nodes (heartbeat times), 6 the call's replay key
-- ARGV: node, now, ttl_s, then (id, request JSON) pairs
-- Returns per request: 1 queued, 0 duplicate. The last key names the call (shared/state/replay.py): a replay answers
-- the first run's flags (run again, the requests it queued would read as duplicates to their client).
local memo = replayed()
if memo ~= nil then return memo end  -- a replay of this very call (shared/state/replay.py)
local node, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local old = redis.call("ZRANGEBYSCORE", KEYS[3], "-inf", now - ttl, "LIMIT", 0, math.max(100, #ARGV - 3))
if #old > 0 then redis.call("ZREM", KEYS[3], unpack(old)) end
local out, queued = {}, 0
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call("HEXISTS", KEYS[2], id) == 1 or redis.call("ZSCORE", KEYS[3], id) then
    out[#out + 1] = 0
  else
    redis.call("HSET", KEYS[2], id, ARGV[i + 1])
    redis.call("RPUSH", KEYS[1], id)
    queued = queued + 1
    out[#out + 1] = 1
  end
end
if queued > 0 then
  redis.call("ZINCRBY", KEYS[4], queued, node)
  redis.call("ZADD", KEYS[5], "NX", now, node)
end
if queued > 0 then return remember(out) end
return out
