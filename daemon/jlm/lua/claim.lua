-- claim.lua: a worker claims one job for one run, atomically.
--
-- KEYS[1]  job hash            fields written here: state, owner, claim, lease_until, attempt,
--                              started_at, updated_at (and error, cancel_reason on a lost job)
-- KEYS[2]  job history         list of JSON entries
-- ARGV[1]  worker id           becomes the job's `owner`
-- ARGV[2]  now                 RFC 3339 (history and timestamps)
-- ARGV[3]  lease               milliseconds; the deadline is Redis TIME + lease
-- ARGV[4]  max_attempts        the worker's own setting for the job type, or '' to use the one
--                              the daemon recorded on the job (1 when none is recorded)
-- ARGV[5]  history bound       entries kept per job
-- ARGV[6]  job TTL             seconds
-- ARGV[7]  terminal TTL        seconds a job that ends here (a lost run) is kept; optional:
--                              without it, job TTL (prelude.lua: ttl_of)
-- ARGV[8]  max history jobs    terminal jobs the job's scope keeps; a job that ends here may
--                              delete the scope's oldest. Optional: without it, none is deleted
--                              (prelude.lua: retire)
--
-- The decision reads only the job's record: nothing of the job message (a header such as
-- x-jlm-gen can be forged by anyone who may publish to jlm.jobs) can make a job be skipped.
--
-- Returns a JSON object: o (claimed | skip | wait | lost), state (after), and
--   claimed: attempt, claim (claim sequence: with owner it names this run), lease_until (ms),
--            recovered (the previous worker's lease had expired)
--   skip:    reason (cancelled | succeeded | failed | unknown | superseded)
--   wait:    wait_ms (until the live lease of another run expires), owner
--   lost:    the previous worker's lease expired and no attempt is left (state failed), or the
--            job was superseded meanwhile (state cancelled)
-- and job_type, cache_prefix, priority, request_id, attempt, superseded_by of the job when known,
-- and the job type's settings: max_attempts (the one that decided here), and result_ttl,
-- retry_backoff, queue as the daemon recorded them on the job (absent when it did not).

local owner, now, lease_ms, max_attempts = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local bound, ttl, terminal_ttl, max_kept = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]

local job_note = job_noter(KEYS[1], KEYS[2], now, bound, ttl, terminal_ttl)

local j = redis.call('HMGET', KEYS[1], 'state', 'job_type', 'cache_prefix', 'priority',
  'request_id', 'attempt', 'owner', 'lease_until', 'superseded_by', 'claim', 'max_attempts',
  'result_ttl', 'retry_backoff', 'queue')
local state = j[1]
if not state then
  return cjson.encode({o = 'skip', reason = 'unknown', state = 'unknown'})
end

local attempt = tonumber(j[6] or '0')
local _, now_ms = server_time()
-- A recorded number, or nil (left out of the reply) when the job has none.
local function num(v)
  if v then
    return tonumber(v)
  end
  return nil
end
local f = {state = state, job_type = j[2] or nil, cache_prefix = j[3] or nil,
  priority = tonumber(j[4] or '5'), request_id = j[5] or nil, attempt = attempt,
  superseded_by = j[9] or nil,
  max_attempts = tonumber(max_attempts ~= '' and max_attempts or j[11] or '1'),
  result_ttl = num(j[12]), retry_backoff = num(j[13]), queue = j[14] or nil}
max_attempts = f.max_attempts

local function skip(reason)
  f.o, f.reason = 'skip', reason
  return cjson.encode(f)
end

if state == 'cancelled' or state == 'succeeded' or state == 'failed' then
  return skip(state)
end

local recovered = false
if state == 'pending' then
  if j[9] then
    return skip('superseded')
  end
elseif state == 'running' then
  local lease = tonumber(j[8] or '0')
  if lease > now_ms then
    f.o, f.wait_ms, f.owner = 'wait', lease - now_ms, j[7]
    return cjson.encode(f)
  end
  -- The lease expired: the worker that ran this job is gone (its message came back to us).
  local lost = 'worker ' .. tostring(j[7]) .. ' lost (lease expired)'
  if j[9] then
    redis.call('HSET', KEYS[1], 'state', 'cancelled', 'cancel_reason', 'superseded',
      'updated_at', now)
    redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
    job_note('cancelled', lost .. '; superseded by ' .. j[9] .. ', not run again')
    retire(KEYS[1], max_kept, terminal_ttl)
    f.o, f.state = 'lost', 'cancelled'
    return cjson.encode(f)
  end
  if attempt >= tonumber(max_attempts) then
    redis.call('HSET', KEYS[1], 'state', 'failed', 'error', 'worker lost', 'updated_at', now,
      'finished_at', now)
    redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
    job_note('failed', lost .. ' after attempt ' .. attempt .. ' of ' .. max_attempts)
    retire(KEYS[1], max_kept, terminal_ttl)
    f.o, f.state = 'lost', 'failed'
    return cjson.encode(f)
  end
  recovered = true
else
  return skip('unknown')
end

attempt = attempt + 1
local claim = tonumber(j[10] or '0') + 1
local lease_until = now_ms + tonumber(lease_ms)
redis.call('HSET', KEYS[1], 'state', 'running', 'owner', owner, 'claim', claim,
  'lease_until', lease_until, 'attempt', attempt, 'started_at', now, 'updated_at', now)
redis.call('HDEL', KEYS[1], 'error')
local why = 'claimed by ' .. owner .. ' (attempt ' .. attempt .. ')'
if recovered then
  why = why .. '; worker ' .. tostring(j[7]) .. ' lost'
end
job_note('running', why)
f.o, f.state, f.attempt, f.claim = 'claimed', 'running', attempt, claim
f.lease_until, f.recovered = lease_until, recovered
return cjson.encode(f)
