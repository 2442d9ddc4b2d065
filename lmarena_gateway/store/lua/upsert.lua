-- ARGV: channel, field, new record JSON, now, keep_bridge ("1"/"0"). As
-- Registration.record: an update keeps created_at and last_used_at, and with
-- keep_bridge the bridge, key and aliases.
local value = ARGV[3]
local old = redis.call('HGET', KEYS[1], ARGV[2])
if old then
  local ok, was = pcall(cjson.decode, old)
  if ok and type(was) == 'table' then
    local new = cjson.decode(value)
    new.created_at = was.created_at
    new.last_used_at = was.last_used_at
    if ARGV[5] == '1' then
      new.bridge_base_url = was.bridge_base_url
      new.bridge_api_key = was.bridge_api_key
      new.models = was.models
      new.upstream = was.upstream
    end
    value = cjson.encode(new)
  end
end
redis.call('HSET', KEYS[1], ARGV[2], value)
raise_score(ARGV[2], tonumber(ARGV[4]))
return {announce(ARGV[2], value), value}
