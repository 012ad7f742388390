-- cancel.lua: cancel one job by id, atomically.
--
-- KEYS[1]  job hash
-- KEYS[2]  job history list
-- KEYS[3]  request record      string: this decision's facts, replayed for a repeated message_id
-- ARGV[1]  running             1: also cancel a running job (its worker is told on ARGV[6])
-- ARGV[2]  now                 RFC 3339
-- ARGV[3]  record the request  0 | 1
-- ARGV[4]  idempotency TTL     seconds
-- ARGV[5]  provenance id of this decision's event
-- ARGV[6]  cancel channel
-- ARGV[7]  job id
-- ARGV[8]  history bound
-- ARGV[9]  job TTL             seconds
--
-- Returns {replayed, facts}: facts is a JSON object: nf (no such job; nothing is written),
-- cancelled, state (after), prev_state, job_type, cache_prefix, at, pid.

if ARGV[3] == '1' then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    return {1, seen}
  end
end

local j = redis.call('HMGET', KEYS[1], 'state', 'job_type', 'cache_prefix')
if not j[1] then
  return {0, cjson.encode({nf = true})}
end

local now = ARGV[2]
local f = {at = now, pid = ARGV[5], prev_state = j[1], job_type = j[2], cache_prefix = j[3]}
local state = j[1]
if state == 'pending' or (state == 'running' and ARGV[1] == '1') then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'updated_at', now, 'cancel_reason', 'requested')
  if state == 'running' then
    redis.call('HSET', KEYS[1], 'cancel_requested', now)
    redis.call('PUBLISH', ARGV[6], ARGV[7])
  end
  redis.call('RPUSH', KEYS[2], cjson.encode({state = 'cancelled', at = now, reason = 'cancelled'}))
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[8]), -1)
  redis.call('EXPIRE', KEYS[1], ARGV[9])
  redis.call('EXPIRE', KEYS[2], ARGV[9])
  f.cancelled, f.state = true, 'cancelled'
else
  f.cancelled, f.state = false, state
end

local facts = cjson.encode(f)
if ARGV[3] == '1' then
  redis.call('SET', KEYS[3], facts, 'EX', ARGV[4])
end
return {0, facts}
