-- Deliver output chunks of requests this node serves to their origin's response list, exactly once:
-- only the lease holder may deliver (a node presumed dead and recovered is fenced out), and a chunk whose
-- sequence number was already delivered (a retry, or a re-run after recovery) is skipped. The final chunk
-- is always delivered by the lease holder and ends the lease, so a final chunk sent again in a new call is
-- refused (-1).
-- KEYS: 1 leases, 2 delivered sequence numbers, 3 bodies, 4 done, 5 origin's response list, 6 own in-flight set,
--       7 the call's replay key
-- ARGV: node, now, response list TTL (s), then (id, seq, finished 0/1, output JSON) quadruples
-- Returns per chunk: 1 delivered, 0 already delivered, -1 not ours (no lease held). The last key names the call
-- (shared/state/replay.py): a replay of the call answers the first run's flags (run again, its final chunks would
-- read as refused: the lease they ended is gone).
local memo = replayed()
if memo ~= nil then return memo end  -- a replay of this very call (shared/state/replay.py)
local node, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out, pushed = {}, 0
for i = 4, #ARGV, 4 do
  local id, seq, fin = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2] == "1"
  if redis.call("HGET", KEYS[1], id) ~= node then
    out[#out + 1] = -1
  else
    local sent = tonumber(redis.call("HGET", KEYS[2], id) or "-1")
    if seq <= sent and not fin then
      out[#out + 1] = 0
    else
      redis.call("RPUSH", KEYS[5], ARGV[i + 3])
      redis.call("HSET", KEYS[2], id, seq)
      pushed = pushed + 1
      out[#out + 1] = 1
      if fin then
        redis.call("HDEL", KEYS[1], id)
        redis.call("HDEL", KEYS[2], id)
        redis.call("HDEL", KEYS[3], id)
        redis.call("SREM", KEYS[6], id)
        redis.call("ZADD", KEYS[4], now, id)
      end
    end
  end
end
if pushed > 0 then
  redis.call("EXPIRE", KEYS[5], math.ceil(ttl))
  return remember(out)
end
return out
