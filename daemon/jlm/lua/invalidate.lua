-- invalidate.lua: drop a scope's cached result, atomically with the request record.
--
-- KEYS[1]  result hash
-- KEYS[2]  request record      string: this decision's facts, replayed for a repeated message_id
-- ARGV[1]  record the request  0 | 1
-- ARGV[2]  idempotency TTL     seconds
-- ARGV[3]  provenance id of this decision's event
-- ARGV[4]  now                 RFC 3339
--
-- Returns {replayed, facts}: facts is a JSON object: inv (a result was dropped), job (the job that
-- had produced it), at, pid.

if ARGV[1] == '1' then
  local seen = redis.call('GET', KEYS[2])
  if seen then
    return {1, seen}
  end
end

local job = redis.call('HGET', KEYS[1], 'job')
local f = {at = ARGV[4], pid = ARGV[3], inv = false}
if job then
  redis.call('DEL', KEYS[1])
  f.inv, f.job = true, job
end
local facts = cjson.encode(f)
if ARGV[1] == '1' then
  redis.call('SET', KEYS[2], facts, 'EX', ARGV[2])
end
return {0, facts}
