-- take_due.lua: a scheduler takes the due entries of one due set, atomically.
--
-- KEYS[1]  due set     sorted set: scheduled job id -> due time (ms since the epoch)
-- KEYS[2]  taken set   sorted set: job id -> lease deadline (ms); same hash tag as KEYS[1]
-- ARGV[1]  limit       entries taken at most
-- ARGV[2]  lease       ms a taker has to publish an entry before another daemon may take it
--
-- Entries whose lease expired (their taker died between the take and the publish) are taken
-- first, then entries due by the Redis server's clock. Each moves to the taken set with a new
-- lease; the taker settles it (settle_due.lua) once its job is published, or found not due.
-- Returns the job ids taken.

local _, now = server_time()
local limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}

local function take(set, n)
  if n <= 0 then
    return
  end
  local ids = redis.call('ZRANGEBYSCORE', set, '-inf', now, 'LIMIT', 0, n)
  for _, id in ipairs(ids) do
    redis.call('ZADD', KEYS[2], string.format('%d', now + lease), id)
    if set == KEYS[1] then
      redis.call('ZREM', KEYS[1], id)
    end
    out[#out + 1] = id
  end
end

take(KEYS[2], limit)
take(KEYS[1], limit - #out)
return out
