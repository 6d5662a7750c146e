-- Take the first k ids of a node's list (own or a peer's) if they are still exactly the ones the caller
-- planned on (compare-and-set: another node may have taken some meanwhile), leasing them to the taker.
-- KEYS: 1 source request list, 2 source load table, 3 leases, 4 taker's in-flight set, 5 nodes (heartbeat
--       times), 6 the call's replay key
-- ARGV: taker, source node, now, then the k expected ids
-- A taker not in the node table (it took before its first heartbeat, or was judged dead, recovered and dropped,
-- then took again) is entered (NX): otherwise nobody would ever recover its leases if it died holding them.
-- Returns 1 taken, 0 the head changed (nothing taken). The last key names the call (shared/state/replay.py): a
-- replay answers 1 again (run again, the ids it leased would be gone from the head: a 0 would leave them leased
-- to a live taker that never serves them).
local memo = replayed()
if memo ~= nil then return memo end  -- a replay of this very call (shared/state/replay.py)
local k = #ARGV - 3
if k < 1 then return 1 end
local head = redis.call("LRANGE", KEYS[1], 0, k - 1)
if #head ~= k then return 0 end
for i = 1, k do
  if head[i] ~= ARGV[i + 3] then return 0 end
end
redis.call("LTRIM", KEYS[1], k, -1)
for i = 1, k do
  redis.call("HSET", KEYS[3], head[i], ARGV[1])
  redis.call("SADD", KEYS[4], head[i])
end
redis.call("ZADD", KEYS[5], "NX", tonumber(ARGV[3]), ARGV[1])
if tonumber(redis.call("ZINCRBY", KEYS[2], -k, ARGV[2])) <= 0 then redis.call("ZREM", KEYS[2], ARGV[2]) end
return remember(1)
