-- KEYS: sessions hash, the session's conversations hash, the zset of every conversation
-- by last use (members "field\ndigest"). ARGV: session field, digest, value, last use,
-- cap, digests to drop... Returns 0 when the session is gone (nothing is written).
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local member = ARGV[1] .. '\n'
for i = 6, #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('ZREM', KEYS[3], member .. ARGV[i])
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], tonumber(ARGV[4]), member .. ARGV[2])
local extra = redis.call('HLEN', KEYS[2]) - tonumber(ARGV[5])
if extra > 0 then
  local flat = redis.call('HGETALL', KEYS[2])
  local ages = {}
  for i = 1, #flat, 2 do
    local ok, held = pcall(cjson.decode, flat[i + 1])
    local used = ok and type(held) == 'table' and tonumber(held.last_used_at) or 0
    ages[#ages + 1] = {flat[i], used}
  end
  table.sort(ages, function(a, b) return a[2] < b[2] end)
  for i = 1, extra do
    redis.call('HDEL', KEYS[2], ages[i][1])
    redis.call('ZREM', KEYS[3], member .. ages[i][1])
  end
end
return 1
