-- cancel.lua: cancel one job by id, atomically (after prelude.lua, record.lua).
--
-- KEYS[1]  job hash
-- KEYS[2]  job history list
-- KEYS[3]  request record      hash (record.lua), or a placeholder when the request has no message_id
-- KEYS[4]  binding             string (record.lua); a placeholder unless ARGV[11] is 1
-- ARGV[1]  running             1: also cancel a running job (its worker is told on ARGV[6])
-- ARGV[2]  now                 RFC 3339
-- ARGV[3]  record the request  0 | 1
-- ARGV[4]  idempotency TTL     seconds
-- ARGV[5]  provenance id of this decision's event
-- ARGV[6]  cancel channel
-- ARGV[7]  job id
-- ARGV[8]  history bound
-- ARGV[9]  job TTL             seconds
-- ARGV[10] request digest      what the idempotency key is bound to
-- ARGV[11] bind here           1 on one Redis; 0 when bind.lua has bound the key already
-- ARGV[12] session             broker session of a redelivered message, '' for a first delivery
-- ARGV[13] terminal TTL        seconds the cancelled job is kept (prelude.lua: ttl_of)
-- ARGV[14] max history jobs    terminal jobs its scope keeps; the cancelled job may delete the
--                              scope's oldest (prelude.lua: retire)
--
-- Returns {status, facts, false, false, republish}: status 0 decided now, 1 a replay of the
-- recorded facts (nothing changed; republish as in manage.lua), 2 the idempotency key is bound to
-- another request (nothing changed). facts is a JSON
-- object: nf (no such job; nothing is written), cancelled, state (after), prev_state, job_type,
-- cache_prefix, at, pid.

local running, now, record_it, idem_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local pid, channel, job_id, bound, job_ttl = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9]
local digest, bind, session, terminal_ttl = ARGV[10], ARGV[11], ARGV[12], ARGV[13]
local max_kept = ARGV[14]

local replay = recorded(record_it, KEYS[4], KEYS[3], digest, bind, session)
if replay then
  return replay
end

local j = redis.call('HMGET', KEYS[1], 'state', 'job_type', 'cache_prefix')
if not j[1] then
  return {0, cjson.encode({nf = true})}
end

local f = {at = now, pid = pid, prev_state = j[1], job_type = j[2], cache_prefix = j[3]}
local state = j[1]
if state == 'pending' or state == 'scheduled' or (state == 'running' and running == '1') then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'updated_at', now, 'cancel_reason', 'requested')
  if state == 'running' then
    redis.call('HSET', KEYS[1], 'cancel_requested', now)
    redis.call('PUBLISH', channel, job_id)
  end
  note(KEYS[2], 'cancelled', now, 'cancelled', bound, terminal_ttl)
  redis.call('EXPIRE', KEYS[1], terminal_ttl)
  retire(KEYS[1], max_kept, terminal_ttl)
  f.cancelled, f.state = true, 'cancelled'
else
  f.cancelled, f.state = false, state
end

local facts = cjson.encode(f)
if record_it == '1' then
  save(KEYS[4], KEYS[3], digest, bind, facts, idem_ttl)
end
return {0, facts}
