-- bind.lua: bind an idempotency key to one request, on a Redis Cluster (see record.lua).
--
-- KEYS[1]  binding             string: the digest of the request the key is bound to
-- ARGV[1]  request digest
-- ARGV[2]  idempotency TTL     seconds
--
-- Returns 1 when the key is bound to this request (now or before), 0 when it is bound to another
-- (nothing is written then).

local digest, ttl = ARGV[1], ARGV[2]

local bound = redis.call('GET', KEYS[1])
if bound then
  return bound == digest and 1 or 0
end
redis.call('SET', KEYS[1], digest, 'EX', ttl)
return 1
