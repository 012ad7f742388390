-- invalidate.lua: drop a scope's cached result, atomically with the request record (after
-- prelude.lua, record.lua).
--
-- KEYS[1]  result hash
-- KEYS[2]  request record      hash (record.lua), or a placeholder when the request has no message_id
-- KEYS[3]  binding             string (record.lua); a placeholder unless ARGV[6] is 1
-- ARGV[1]  record the request  0 | 1
-- ARGV[2]  idempotency TTL     seconds
-- ARGV[3]  provenance id of this decision's event
-- ARGV[4]  now                 RFC 3339
-- ARGV[5]  request digest      what the idempotency key is bound to
-- ARGV[6]  bind here           1 on one Redis; 0 when bind.lua has bound the key already
-- ARGV[7]  session             broker session of a redelivered message, '' for a first delivery
--
-- Returns {status, facts, false, false, republish}: status 0 decided now, 1 a replay of the
-- recorded facts (nothing changed; republish as in manage.lua), 2 the idempotency key is bound to
-- another request (nothing changed). facts is a JSON
-- object: inv (a result was dropped), job (the job that had produced it), at, pid.

local record_it, idem_ttl, pid, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local digest, bind, session = ARGV[5], ARGV[6], ARGV[7]

local replay = recorded(record_it, KEYS[3], KEYS[2], digest, bind, session)
if replay then
  return replay
end

local job = redis.call('HGET', KEYS[1], 'job')
local f = {at = now, pid = pid, inv = false}
if job then
  redis.call('DEL', KEYS[1])
  f.inv, f.job = true, job
end
local facts = cjson.encode(f)
if record_it == '1' then
  save(KEYS[3], KEYS[2], digest, bind, facts, idem_ttl)
end
return {0, facts}
