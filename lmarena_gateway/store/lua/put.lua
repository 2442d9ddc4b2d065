-- ARGV: channel, field, record JSON, last activity: the record exactly as given (import).
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), ARGV[2])
return announce(ARGV[2], ARGV[3])
