-- ARGV: channel, field, conversations prefix, conversations zset. Returns the change's
-- rev, or 0 when there was no such session.
redis.call('ZREM', KEYS[2], ARGV[2])
drop_conversations(ARGV[3], ARGV[4], ARGV[2])
if redis.call('HDEL', KEYS[1], ARGV[2]) == 0 then return 0 end
return announce(ARGV[2], '')
