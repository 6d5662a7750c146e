-- Set instances to a state (e.g. DRAINING) fenced by the model's converge lock token; only
-- instances currently in one of the allowed states change.
-- KEYS: 1 lock key, 2 inst_state, 3 the call's replay key
-- ARGV: token, new_state, allowed_states (comma-separated), model, then ids (the model's)
-- Returns the ids moved, or -1 when the token no longer holds the lock. A replay of the call answers the first
-- run's ids (run again: none, or -1 once the lock expired, while the first run did move them).
local memo = replayed()
if memo ~= nil then return memo end  -- a replay of this very call (shared/state/replay.py)
if redis.call("GET", KEYS[1]) ~= ARGV[1] then return -1 end
local allowed = {}
for s in string.gmatch(ARGV[3], "[^,]+") do allowed[s] = true end
local changed = {}
for i = 5, #ARGV do
  local cur = redis.call("HGET", KEYS[2], ARGV[i])
  if cur and allowed[cur] then
    redis.call("HSET", KEYS[2], ARGV[i], ARGV[2])
    track(ARGV[4], ARGV[i], ARGV[2])
    changed[#changed + 1] = ARGV[i]
  end
end
if #changed > 0 then return remember(changed) end
return changed
