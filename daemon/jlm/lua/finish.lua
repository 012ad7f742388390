-- finish.lua: record the end of one run (result, error or stop), atomically with its state.
--
-- KEYS[1]  job hash
-- KEYS[2]  job history         list of JSON entries
-- KEYS[3]  scope hash          field `job`: the scope's current job
-- KEYS[4]  result hash         fields job, value (JSON), at; written only for the current job
-- ARGV[1]  outcome             succeeded | failed | stopped (the worker stopped a cancelled job)
-- ARGV[2]  worker id           must be the job's `owner`
-- ARGV[3]  claim sequence      must be the job's `claim`
-- ARGV[4]  now                 RFC 3339
-- ARGV[5]  value               succeeded: the result (JSON); failed: the error text; else ''
-- ARGV[6]  result TTL          seconds
-- ARGV[7]  max_attempts        of the job's type
-- ARGV[8]  job id
-- ARGV[9]  history bound       entries kept per job
-- ARGV[10] job TTL             seconds
-- ARGV[11] stop note           history reason of a stopped run (e.g. `stopped by worker`)
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

local j = redis.call('HMGET', KEYS[1], 'state', 'owner', 'claim', 'attempt', 'superseded_by',
  'cancel_requested', 'request_id', 'gen')
local state = j[1]
local f = {state = state or 'unknown', attempt = tonumber(j[4] or '0'),
  gen = tonumber(j[8] or '0'), request_id = j[7] or nil, superseded_by = j[5] or nil,
  cancel_requested = j[6] or nil}
if not state or j[2] ~= ARGV[2] or j[3] ~= ARGV[3] then
  f.o = 'refused'
  return cjson.encode(f)
end

local outcome, now, value = ARGV[1], ARGV[4], ARGV[5]
local bound, ttl = tonumber(ARGV[9]), tonumber(ARGV[10])

local function note(st, reason)
  redis.call('RPUSH', KEYS[2], cjson.encode({state = st, at = now, reason = reason}))
  redis.call('LTRIM', KEYS[2], -bound, -1)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[1], ttl)
end

local function release_claim()
  redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
end

if state == 'cancelled' then
  release_claim()
  redis.call('HSET', KEYS[1], 'stopped_at', now, 'updated_at', now)
  local why = ARGV[11]
  if outcome == 'succeeded' then
    why, f.refused = 'result refused: the job was cancelled', true
  elseif outcome == 'failed' then
    why = ARGV[11] .. ' (it failed: ' .. value .. ')'
  end
  note('cancelled', why)
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
  if redis.call('HGET', KEYS[3], 'job') == ARGV[8] then
    redis.call('DEL', KEYS[4])
    redis.call('HSET', KEYS[4], 'job', ARGV[8], 'value', value, 'at', now)
    redis.call('EXPIRE', KEYS[4], ARGV[6])
    note('succeeded', 'result cached')
    f.cached = true
  else
    note('succeeded', 'result not cached: superseded by ' .. tostring(j[5]))
    f.cached = false
  end
  f.o, f.state = 'succeeded', 'succeeded'
  return cjson.encode(f)
end

-- failed
redis.call('HSET', KEYS[1], 'error', value, 'updated_at', now)
if f.attempt < tonumber(ARGV[7]) and not j[5] then
  redis.call('HSET', KEYS[1], 'state', 'pending')
  f.gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
  note('pending', 'attempt ' .. f.attempt .. ' failed: ' .. value .. '; retrying')
  f.o, f.state = 'retry', 'pending'
  return cjson.encode(f)
end
redis.call('HSET', KEYS[1], 'state', 'failed', 'finished_at', now)
note('failed', value)
f.o, f.state = 'failed', 'failed'
return cjson.encode(f)
