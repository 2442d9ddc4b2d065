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
-- A session's conversations (a hash of its own, and its members of the zset of every
-- conversation by last use) go with it, in the same step.
local function drop_conversations(prefix, used, field)
  local hash = prefix .. field
  for _, digest in ipairs(redis.call('HKEYS', hash)) do
    redis.call('ZREM', used, field .. '\n' .. digest)
  end
  redis.call('DEL', hash)
end
