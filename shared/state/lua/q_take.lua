-- Take the first k ids of a node's list (own or a peer's) if they are still exactly the ones the caller
-- planned on (compare-and-set: another node may have taken some meanwhile), leasing them to the taker.
-- KEYS: 1 source request list, 2 source load table, 3 leases, 4 taker's in-flight set
-- ARGV: taker, source node, then the k expected ids
-- Returns 1 taken, 0 the head changed (nothing taken)
local k = #ARGV - 2
if k < 1 then return 1 end
local head = redis.call("LRANGE", KEYS[1], 0, k - 1)
if #head ~= k then return 0 end
for i = 1, k do
  if head[i] ~= ARGV[i + 2] then return 0 end
end
redis.call("LTRIM", KEYS[1], k, -1)
for i = 1, k do
  redis.call("HSET", KEYS[3], head[i], ARGV[1])
  redis.call("SADD", KEYS[4], head[i])
end
if tonumber(redis.call("ZINCRBY", KEYS[2], -k, ARGV[2])) <= 0 then redis.call("ZREM", KEYS[2], ARGV[2]) end
return 1
