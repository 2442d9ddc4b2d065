-- ARGV: channel, then (field, ISO time, epoch time)...; only moves last_used_at forward.
local changed = 0
for i = 2, #ARGV, 3 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  local ok, record = false, nil
  if old then ok, record = pcall(cjson.decode, old) end
  if ok and type(record) == 'table'
      and (type(record.last_used_at) ~= 'string' or record.last_used_at < ARGV[i + 1]) then
    record.last_used_at = ARGV[i + 1]
    local value = cjson.encode(record)
    redis.call('HSET', KEYS[1], ARGV[i], value)
    raise_score(ARGV[i], tonumber(ARGV[i + 2]))
    announce(ARGV[i], value)
    changed = changed + 1
  end
end
return changed
