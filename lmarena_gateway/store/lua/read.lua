-- One record and the rev it is current at, in one step: KEYS as announce.lua's,
-- ARGV[1] the channel (unused), ARGV[2] the field. Changes nothing, announces nothing.
return {redis.call('GET', KEYS[3]), redis.call('HGET', KEYS[1], ARGV[2])}
