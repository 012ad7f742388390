-- take_due.lua: a scheduler takes the due entries of one or more due sets, atomically.
--
-- KEYS[2i-1]  due set     sorted set: scheduled job id -> due time (ms since the epoch)
-- KEYS[2i]    taken set   sorted set: job id -> lease deadline (ms); same hash tag as KEYS[2i-1]
-- ARGV[1]     limit       entries taken at most, per due set
-- ARGV[2]     lease       ms a taker has to publish an entry before another daemon may take it
--
-- One pair of keys per due set: on one Redis a sweep passes every due set in one call; on a
-- Redis Cluster, where the sets live in different slots, one call per set.
-- Entries whose lease expired (their taker died between the take and the publish) are taken
-- first, then entries due by the Redis server's clock. Each moves to the taken set with a new
-- lease; the taker settles it (settle_due.lua) once its job is published, or found not due.
-- Returns one list of the job ids taken per due set, in the order of KEYS.

local _, now = server_time()
local limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2])

local function take(set, taken, n, out)
  if n <= 0 then
    return
  end
  local ids = redis.call('ZRANGEBYSCORE', set, '-inf', now, 'LIMIT', 0, n)
  for _, id in ipairs(ids) do
    redis.call('ZADD', taken, string.format('%d', now + lease), id)
    if set ~= taken then
      redis.call('ZREM', set, id)
    end
    out[#out + 1] = id
  end
end

local all = {}
for i = 1, #KEYS, 2 do
  local due, taken, out = KEYS[i], KEYS[i + 1], {}
  take(taken, taken, limit, out)
  take(due, taken, limit - #out, out)
  all[#all + 1] = out
end
return all
