-- KEYS: the zset of every conversation by last use. ARGV: conversations prefix, cutoff,
-- batch size. Removes up to a batch of those last used before the cutoff; returns how many.
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0,
                        tonumber(ARGV[3]))
for _, member in ipairs(gone) do
  local cut = string.find(member, '\n', 1, true)
  if cut then
    redis.call('HDEL', ARGV[1] .. string.sub(member, 1, cut - 1), string.sub(member, cut + 1))
  end
  redis.call('ZREM', KEYS[1], member)
end
return #gone
