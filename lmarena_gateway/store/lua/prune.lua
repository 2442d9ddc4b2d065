-- ARGV: channel, cutoff, conversations prefix, conversations zset, candidate fields...
-- Removes those still idle since before the cutoff (and their conversations), so
-- instances pruning at once each remove a session at most once between them.
local removed = {}
local cutoff = tonumber(ARGV[2])
for i = 5, #ARGV do
  local score = redis.call('ZSCORE', KEYS[2], ARGV[i])
  if score and tonumber(score) < cutoff then
    redis.call('ZREM', KEYS[2], ARGV[i])
    drop_conversations(ARGV[3], ARGV[4], ARGV[i])
    local old = redis.call('HGET', KEYS[1], ARGV[i])
    if old then
      redis.call('HDEL', KEYS[1], ARGV[i])
      removed[#removed + 1] = announce(ARGV[i], '')
      removed[#removed + 1] = old
    end
  end
end
return removed
