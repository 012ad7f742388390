-- finish.lua: record the end of one run (result, error or stop), atomically with its state.
--
-- KEYS[1]  job hash
-- KEYS[2]  job history         list of JSON entries
-- KEYS[3]  scope hash          field `job`: the scope's current job
-- KEYS[4]  result hash         fields job, value (JSON), at; written only for the current job
-- ARGV[1]  outcome             succeeded | failed | stopped (the worker stopped a cancelled job)
--                              | rejected (failed, never retried: e.g. a payload its handler's
--                              model refuses, which would fail every attempt)
-- ARGV[2]  worker id           must be the job's `owner`
-- ARGV[3]  claim sequence      must be the job's `claim`
-- ARGV[4]  now                 RFC 3339
-- ARGV[5]  value               succeeded: the result (JSON); failed: the error text; else ''
-- ARGV[6]  result TTL          seconds      } of the job's type: as claim.lua answered them
-- ARGV[7]  max_attempts                     }
-- ARGV[8]  job id
-- ARGV[9]  history bound       entries kept per job
-- ARGV[10] job TTL             seconds
-- ARGV[11] stop note           history reason of a stopped run (e.g. `stopped by worker`)
-- ARGV[12] terminal TTL        seconds a job that ends here is kept; optional: without it,
--                              job TTL (prelude.lua: ttl_of)
-- ARGV[13] max history jobs    terminal jobs the job's scope keeps; a job that ends here may
--                              delete the scope's oldest. Optional: without it, none is deleted
--                              (prelude.lua: retire)
--
-- Returns a JSON object: o, state (after), attempt, gen, request_id, superseded_by,
-- cancel_requested, and
--   o = succeeded  cached: true when the result was written (the job is the scope's current job),
--                  false when the job was superseded while running (a refused late result)
--   o = retry      back to `pending` (attempts left); `gen` counts the retries: the worker
--                  re-publishes the job message with x-jlm-gen = gen (informational only)
--   o = failed     final failure
--   o = stopped    the job was cancelled while running here; whatever the run produced is refused
--                  (refused: true when it was a result)
--   o = refused    this run no longer holds the job (another claim, or it was not running):
--                  nothing is written

local outcome, owner, claim, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local value, result_ttl, max_attempts, job_id = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local bound, ttl, stop_note = tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11]
local terminal_ttl, max_kept = ARGV[12], ARGV[13]

local job_note = job_noter(KEYS[1], KEYS[2], now, bound, ttl, terminal_ttl)

local j = redis.call('HMGET', KEYS[1], 'state', 'owner', 'claim', 'attempt', 'superseded_by',
  'cancel_requested', 'request_id', 'gen')
local state = j[1]
local retry = outcome == 'failed'
if outcome == 'rejected' then
  outcome = 'failed'
end
local f = {state = state or 'unknown', attempt = tonumber(j[4] or '0'),
  gen = tonumber(j[8] or '0'), request_id = j[7] or nil, superseded_by = j[5] or nil,
  cancel_requested = j[6] or nil}
if not state or j[2] ~= owner or j[3] ~= claim then
  f.o = 'refused'
  return cjson.encode(f)
end

local function release_claim()
  redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
end

if state == 'cancelled' then
  release_claim()
  redis.call('HSET', KEYS[1], 'stopped_at', now, 'updated_at', now)
  local why = stop_note
  if outcome == 'succeeded' then
    why, f.refused = 'result refused: the job was cancelled', true
  elseif outcome == 'failed' then
    why = stop_note .. ' (it failed: ' .. value .. ')'
  end
  job_note('cancelled', why)
  retire(KEYS[1], max_kept, terminal_ttl)  -- held no more: counted now
  f.o = 'stopped'
  return cjson.encode(f)
end
if state ~= 'running' or outcome == 'stopped' then
  f.o = 'refused'
  return cjson.encode(f)
end

release_claim()
if outcome == 'succeeded' then
  redis.call('HSET', KEYS[1], 'state', 'succeeded', 'updated_at', now, 'finished_at', now)
  if redis.call('HGET', KEYS[3], 'job') == job_id then
    redis.call('DEL', KEYS[4])
    redis.call('HSET', KEYS[4], 'job', job_id, 'value', value, 'at', now)
    redis.call('EXPIRE', KEYS[4], result_ttl)
    job_note('succeeded', 'result cached')
    f.cached = true
  else
    job_note('succeeded', 'result not cached: superseded by ' .. tostring(j[5]))
    f.cached = false
  end
  retire(KEYS[1], max_kept, terminal_ttl)
  f.o, f.state = 'succeeded', 'succeeded'
  return cjson.encode(f)
end

-- failed
redis.call('HSET', KEYS[1], 'error', value, 'updated_at', now)
if retry and f.attempt < tonumber(max_attempts) and not j[5] then
  redis.call('HSET', KEYS[1], 'state', 'pending')
  f.gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
  job_note('pending', 'attempt ' .. f.attempt .. ' failed: ' .. value .. '; retrying')
  f.o, f.state = 'retry', 'pending'
  return cjson.encode(f)
end
redis.call('HSET', KEYS[1], 'state', 'failed', 'finished_at', now)
job_note('failed', value)
retire(KEYS[1], max_kept, terminal_ttl)
f.o, f.state = 'failed', 'failed'
return cjson.encode(f)
