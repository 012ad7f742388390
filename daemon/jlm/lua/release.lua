-- release.lua: a stopping worker gives a running job back, atomically.
--
-- KEYS[1]  job hash
-- KEYS[2]  job history         list of JSON entries
-- ARGV[1]  worker id           must be the job's `owner`
-- ARGV[2]  claim sequence      must be the job's `claim`
-- ARGV[3]  now                 RFC 3339
-- ARGV[4]  reason              history note, e.g. `released: worker stopping`
-- ARGV[5]  history bound       entries kept per job
-- ARGV[6]  job TTL             seconds
-- ARGV[7]  terminal TTL        seconds a job that ends here is kept; optional: without it,
--                              job TTL (prelude.lua: ttl_of)
-- ARGV[8]  max history jobs    terminal jobs the job's scope keeps; a job that ends here may
--                              delete the scope's oldest. Optional: without it, none is deleted
--                              (prelude.lua: retire)
--
-- Returns a JSON object: o, state (after), request_id, cancel_requested, and
--   o = released   running → pending, owner cleared, attempt given back (a release is not a
--                  failed attempt); the worker nacks the message with requeue
--   o = cancelled  the job was superseded while running: it is cancelled instead of run again
--   o = stopped    the job was cancelled meanwhile; the stop is recorded
--   o = refused    this run no longer holds the job: nothing is written

local owner, claim, now, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local bound, ttl, terminal_ttl, max_kept = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]

local job_note = job_noter(KEYS[1], KEYS[2], now, bound, ttl, terminal_ttl)

local j = redis.call('HMGET', KEYS[1], 'state', 'owner', 'claim', 'attempt', 'superseded_by',
  'cancel_requested', 'request_id')
local state = j[1]
local f = {state = state or 'unknown', request_id = j[7] or nil, cancel_requested = j[6] or nil}
if not state or j[2] ~= owner or j[3] ~= claim or
    (state ~= 'running' and state ~= 'cancelled') then
  f.o = 'refused'
  return cjson.encode(f)
end

redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
redis.call('HSET', KEYS[1], 'updated_at', now)
if state == 'cancelled' then
  redis.call('HSET', KEYS[1], 'stopped_at', now)
  job_note('cancelled', 'stopped by worker')
  retire(KEYS[1], max_kept, terminal_ttl)  -- held no more: counted now
  f.o = 'stopped'
elseif j[5] then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'cancel_reason', 'superseded')
  job_note('cancelled', reason .. '; superseded by ' .. j[5] .. ', not run again')
  retire(KEYS[1], max_kept, terminal_ttl)
  f.o, f.state = 'cancelled', 'cancelled'
else
  redis.call('HSET', KEYS[1], 'state', 'pending', 'attempt', math.max(tonumber(j[4] or '1') - 1, 0))
  job_note('pending', reason)
  f.o, f.state = 'released', 'pending'
end
return cjson.encode(f)
