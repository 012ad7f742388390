-- manage.lua: one `manage` decision for one dedup scope, atomically (after prelude.lua, record.lua,
-- schedule.lua).
--
-- KEYS[1]  scope hash          fields: job (current job id), at (its requested_at, µs)
-- KEYS[2]  result hash         fields: job, value (JSON), at
-- KEYS[3]  request record      hash (record.lua), or a placeholder when the request has no message_id
-- KEYS[4]  new job hash
-- KEYS[5]  new job history     list of JSON entries
-- KEYS[6]  binding             string (record.lua); a placeholder unless ARGV[18] is 1
-- ARGV[1]  policy              replace | skip | reuse | debounce
-- ARGV[2]  new job id
-- ARGV[3]  now                 RFC 3339
-- ARGV[4]  requested_at        µs since the epoch, or '' when the request has none: then the
--                              request is stamped here with the server's TIME and is never stale
-- ARGV[5]  cancel_running      0 | 1
-- ARGV[6]  record the request  0 | 1 (1 when the request has a message_id)
-- ARGV[7]  idempotency TTL     seconds
-- ARGV[8]  job TTL             seconds
-- ARGV[9]  job key prefix      `<prefix><id>` is a job hash and `<prefix><id>:h` its history;
--                              same hash tag as KEYS[1..5], so those keys share the slot
-- ARGV[10] job_type   ARGV[11] cache_prefix   ARGV[12] priority   ARGV[13] request id
-- ARGV[14] provenance id of this decision's event
-- ARGV[15] cancel channel      workers running a job cancelled here are told on it
-- ARGV[16] history bound       entries kept per job
-- ARGV[17] request digest      what the idempotency key is bound to
-- ARGV[18] bind here           1 on one Redis; 0 when bind.lua has bound the key already
-- ARGV[19] session             broker session of a redelivered message, '' for a first delivery
-- ARGV[20] terminal TTL        seconds a job made terminal here is kept (prelude.lua: ttl_of)
-- ARGV[21] max_attempts   ARGV[22] result_ttl (s)   ARGV[23] retry_backoff (s)   ARGV[24] queue
--                              the job type's settings, recorded on the new job so that workers
--                              and their scripts read them there (docs/worker-protocol.md)
-- ARGV[25] schedule            '' or a JSON object (schedule.lua): debounce window, max wait,
--                              not_before, payload
-- ARGV[26] max history jobs    terminal jobs the scope keeps; a job made terminal here may delete
--                              the scope's oldest (prelude.lua: retire). Recorded on the new job
--                              (`max_history`): the scripts that end it later apply that bound
--
-- Returns {status, facts, result, job state, republish}:
--   status 0: decided now. facts is a JSON object: d (enqueued | deduplicated | scheduled), job,
--     state, due (a scheduled job's due time: ms since the epoch, a string), ext (a debounce
--     restarted the window of the scope's scheduled job), prev, prev_state, why (skip | reuse |
--     stale), stale (pending or scheduled job cancelled), sup (previous job superseded), rc
--     (running job cancelled), inv (cache invalidated), at, pri (priority), pid.
--     result is the cached JSON on a reuse hit (never recorded: the record names its job only).
--   status 1: a replay of the recorded facts; nothing changed. result is the cached JSON of a
--     reuse hit while the result of the recorded job is still cached; job state is the decided
--     job's state now (false once it expired); republish is 1 when this delivery is to publish
--     the decision's job and events again (record.lua: take_republish).
--   status 2: the idempotency key is bound to another request; nothing changed.

local policy, new_id, now, at = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local cancel_running, record_it = ARGV[5], ARGV[6]
local idem_ttl, job_ttl, prefix = ARGV[7], tonumber(ARGV[8]), ARGV[9]
local job_type, cache_prefix, priority, request_id = ARGV[10], ARGV[11], ARGV[12], ARGV[13]
local pid, channel, bound = ARGV[14], ARGV[15], tonumber(ARGV[16])
local digest, bind, session = ARGV[17], ARGV[18], ARGV[19]
local terminal_ttl = ARGV[20]
local max_attempts, result_ttl, retry_backoff, job_queue = ARGV[21], ARGV[22], ARGV[23], ARGV[24]
local sched = schedule_of(ARGV[25])
local max_kept = ARGV[26]

local replay = recorded(record_it, KEYS[6], KEYS[3], digest, bind, session, function(facts)
  local f = cjson.decode(facts)
  local result = false
  if f.why == 'reuse' then
    local r = redis.call('HMGET', KEYS[2], 'job', 'value')
    if r[1] == f.job then
      result = r[2]
    end
  end
  return result, redis.call('HGET', prefix .. f.job, 'state')
end)
if replay then
  return replay
end

local cur = redis.call('HMGET', KEYS[1], 'job', 'at')
local cur_id, cur_state = cur[1], false
if cur_id then
  cur_state = redis.call('HGET', prefix .. cur_id, 'state')
  if not cur_state then
    cur_id = false  -- the job expired: the scope is free
  end
end

-- µs since the epoch, as a string.
local stamped = at == ''
if stamped then
  at = server_time()
end

local f = {at = now, pid = pid, pri = tonumber(priority)}
local result = false
local live = cur_state == 'pending' or cur_state == 'running' or cur_state == 'scheduled'
if cur_id then
  f.prev = cur_id
  f.prev_state = cur_state
end

local function finish()
  local facts = cjson.encode(f)
  if record_it == '1' then
    save(KEYS[6], KEYS[3], digest, bind, facts, idem_ttl)
  end
  return {0, facts, result}
end

local function dedup(job_id, state, why)
  f.d, f.job, f.state, f.why = 'deduplicated', job_id, state, why
  return finish()
end

-- A request older than the scope's current job never supersedes it. A request stamped here is
-- ordered by this decision: it is never older.
if cur_id and not stamped and tonumber(at) < tonumber(cur[2] or '0') then
  return dedup(cur_id, cur_state, 'stale')
end

if policy == 'reuse' then
  local r = redis.call('HMGET', KEYS[2], 'job', 'value')
  if r[1] then
    result = r[2]
    return dedup(r[1], redis.call('HGET', prefix .. r[1], 'state') or 'succeeded', 'reuse')
  end
end
if (policy == 'skip' or policy == 'reuse') and live then
  return dedup(cur_id, cur_state, 'skip')
end

-- Debounce (schedule.lua): the scope's scheduled job takes this request and waits again.
local now_ms = 0  -- the server's time, read only for a job that may be held back
if sched then
  now_ms = select(2, server_time())
end
if policy == 'debounce' and cur_state == 'scheduled' then
  f.d, f.job, f.state, f.ext = 'scheduled', cur_id, 'scheduled', true
  f.due = debounce(prefix .. cur_id, sched, now_ms, now, priority, job_ttl, bound)
  redis.call('HSET', KEYS[1], 'at', at)
  redis.call('EXPIRE', KEYS[1], job_ttl + wait_s(tonumber(f.due), now_ms))
  return finish()
end

-- Enqueue a new job, superseding the current one.
local inv = false
if cur_id then
  local old = prefix .. cur_id
  if cur_state == 'pending' or cur_state == 'scheduled' then
    redis.call('HSET', old, 'state', 'cancelled', 'superseded_by', new_id, 'updated_at', now,
      'cancel_reason', 'superseded')
    note(old .. ':h', 'cancelled', now, 'superseded by ' .. new_id, bound, terminal_ttl)
    f.stale, f.sup = true, true
  elseif cur_state == 'running' then
    redis.call('HSET', old, 'superseded_by', new_id, 'updated_at', now)
    f.sup = true
    if cancel_running == '1' then
      redis.call('HSET', old, 'state', 'cancelled', 'cancel_requested', now,
        'cancel_reason', 'superseded')
      note(old .. ':h', 'cancelled', now, 'superseded by ' .. new_id .. ' (cancel_running)',
        bound, terminal_ttl)
      redis.call('PUBLISH', channel, cur_id)
      f.rc = true
    else
      note(old .. ':h', 'running', now, 'superseded by ' .. new_id, bound, job_ttl)
    end
  end
  redis.call('EXPIRE', old, ttl_of(redis.call('HGET', old, 'state'), job_ttl, terminal_ttl))
  if f.stale or f.rc then
    retire(old, max_kept, terminal_ttl)
  end
  if policy == 'replace' or policy == 'debounce' then
    inv = true
  end
end
if (policy == 'replace' or policy == 'debounce') and redis.call('DEL', KEYS[2]) == 1 then
  inv = true
end
f.inv = inv

-- A held job (schedule.lua) is `scheduled` until due, and its keys live its wait longer.
local due = first_due(sched, now_ms)
local state, ttl = 'pending', job_ttl
if due then
  state, ttl = 'scheduled', job_ttl + wait_s(due, now_ms)
end
redis.call('HSET', KEYS[4], 'state', state, 'job_type', job_type, 'cache_prefix', cache_prefix,
  'priority', priority, 'created_at', now, 'updated_at', now, 'attempt', 0,
  'request_id', request_id, 'requested_at', at)
redis.call('HSET', KEYS[4], 'max_attempts', max_attempts, 'result_ttl', result_ttl,
  'retry_backoff', retry_backoff, 'queue', job_queue, 'max_history', max_kept)
if due then
  hold(KEYS[4], sched, due, now_ms)
end
redis.call('EXPIRE', KEYS[4], ttl)
note(KEYS[4] .. ':h', state, now, due and 'scheduled' or 'enqueued', bound, ttl)
redis.call('HSET', KEYS[1], 'job', new_id, 'at', at)
redis.call('EXPIRE', KEYS[1], ttl)

f.d, f.job, f.state = 'enqueued', new_id, 'pending'
if due then
  f.d, f.state, f.due = 'scheduled', 'scheduled', ms(due)
end
return finish()
