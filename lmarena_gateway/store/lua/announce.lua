-- Shared by every script. KEYS: sessions hash, activity zset, rev counter.
-- ARGV[1]: the change channel. Each change bumps the rev and is published as
-- "rev\nfield\nvalue" (an empty value: deleted).
local function announce(field, value)
  local rev = redis.call('INCR', KEYS[3])
  redis.call('PUBLISH', ARGV[1], rev .. '\n' .. field .. '\n' .. value)
  return rev
end
local function raise_score(field, score)
  local current = redis.call('ZSCORE', KEYS[2], field)
  if (not current) or tonumber(current) < score then
    redis.call('ZADD', KEYS[2], score, field)
  end
end
