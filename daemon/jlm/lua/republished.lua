-- republished.lua: note on a request record that a redelivery published its decision again.
--
-- KEYS[1]  request record      hash (see record.lua)
-- ARGV[1]  request digest      the record is only touched if it is still bound to this request
--
-- Returns 1 when noted, 0 when the record is gone (expired) or bound to another request.

if redis.call('HGET', KEYS[1], 'dg') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'ok', 1)
return 1
