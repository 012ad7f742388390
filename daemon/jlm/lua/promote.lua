-- promote.lua: a taken due entry's job becomes pending if it is due; the scheduler then publishes
-- its job message. The state changes before the publish: a worker claims only a pending job, so a
-- message published first could meet a worker while its job is still scheduled.
--
-- KEYS[1]  job hash
-- KEYS[2]  job history list
-- ARGV[1]  now            RFC 3339
-- ARGV[2]  history bound
-- ARGV[3]  job TTL        seconds
-- ARGV[4]  lease          ms (take_due.lua)
--
-- Returns {verdict, due, server ms, job_type, cache_prefix, payload, priority, enqueued_at}:
--   publish  the job is pending now and its message is to be published; also a job a scheduler
--            made pending at least half a lease ago, whose entry is still taken: that scheduler
--            died before it settled, maybe before it published (a worker claims a job once)
--   later    scheduled, not due yet (due is its time now)
--   drop     nothing to publish: cancelled, superseded, claimed, published, or gone

local _, now_ms = server_time()
local now, bound, ttl, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local j = redis.call('HMGET', KEYS[1], 'state', 'due', 'job_type', 'cache_prefix', 'payload',
  'priority', 'promoted', 'promoted_at')
local state, due = j[1], tonumber(j[2]) or 0

local function publish(at)
  return {'publish', due, now_ms, j[3], j[4], j[5], j[6], at}
end

if state == 'scheduled' then
  if due > now_ms then
    return {'later', due, now_ms}
  end
  redis.call('HSET', KEYS[1], 'state', 'pending', 'updated_at', now,
    'promoted', string.format('%d', now_ms), 'promoted_at', now)
  redis.call('EXPIRE', KEYS[1], ttl)
  note(KEYS[2], 'pending', now, 'due: published by the scheduler', bound, ttl)
  return publish(now)
end
if state == 'pending' and j[7] and now_ms - tonumber(j[7]) >= lease / 2 then
  return publish(j[8])
end
return {'drop', due, now_ms}
