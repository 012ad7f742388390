-- prelude.lua: the helpers every script is loaded with (store.load_lua prepends it). A helper a
-- script does not call issues no command: the Redis ACLs list only the commands scripts call.

-- The Redis server's time: µs since the epoch as a string (a Lua number would print 16 digits in
-- exponent form), and ms since the epoch as a number.
local function server_time()
  local t = redis.call('TIME')
  local us = t[1] .. string.format('%06d', tonumber(t[2]))
  return us, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- One entry of a job's history (a list of JSON entries): appended, the list trimmed to its last
-- `bound` entries and kept `ttl` seconds.
local function note(history, state, at, reason, bound, ttl)
  redis.call('RPUSH', history, cjson.encode({state = state, at = at, reason = reason}))
  redis.call('LTRIM', history, -bound, -1)
  redis.call('EXPIRE', history, ttl)
end

-- How long a job in `state` is kept, its hash and its history: a terminal job (succeeded, failed,
-- cancelled) `terminal_ttl` seconds, any other `job_ttl` seconds, both from its last change.
-- A worker written before terminal_ttl passes none: its ended jobs keep `job_ttl`.
local function ttl_of(state, job_ttl, terminal_ttl)
  if terminal_ttl and (state == 'succeeded' or state == 'failed' or state == 'cancelled') then
    return tonumber(terminal_ttl)
  end
  return tonumber(job_ttl)
end

-- job_note(state, reason) for one job: a history entry (`note`), and the job's TTL renewed with
-- it: as long as that state keeps a job (`ttl_of`).
local function job_noter(job, history, at, bound, job_ttl, terminal_ttl)
  return function(st, reason)
    local keep = ttl_of(st, job_ttl, terminal_ttl)
    note(history, st, at, reason, bound, keep)
    redis.call('EXPIRE', job, keep)
  end
end

-- A job that has just become terminal counts toward its scope's bound: its scope keeps at most
-- `max_history` terminal jobs, the bound recorded on the job at its decision (manage.lua), or else
-- `max_kept` (the caller's setting: jobs decided before the bound was recorded). The job joins the
-- scope's ended set (`<base>:ended:<cache_prefix>:<job_type>`, same hash tag; member the job id,
-- score µs since the epoch, Redis TIME) and, while the set holds more than the bound, its oldest
-- are deleted at once, job hash and history. The set lives `terminal_ttl` from its last addition,
-- as long as its newest member. Counted once however often it is called (ZADD NX). A job
-- cancelled while a worker still holds its run (an `owner` whose lease is not over) is not counted
-- yet, so the bound cannot delete it before its stop is recorded: the script that records the
-- stop (finish.lua, release.lua) calls this again, and counts it then. Without a bound (neither
-- recorded nor passed), or for a caller that passes no `terminal_ttl` (a worker written before it:
-- its ended jobs keep `job_ttl`), nothing.
local function retire(job, max_kept, terminal_ttl)
  local base, id = string.match(job, '^(.*):job:([^:]+)$')
  local j = redis.call('HMGET', job, 'cache_prefix', 'job_type', 'max_history', 'owner',
    'lease_until')
  local bound = tonumber(j[3] or max_kept)
  if not bound or not terminal_ttl or not base or not j[1] or not j[2] then
    return
  end
  local now_us, now_ms = server_time()
  if j[4] and tonumber(j[5] or 0) > now_ms then
    return
  end
  local ended = base .. ':ended:' .. j[1] .. ':' .. j[2]
  redis.call('ZADD', ended, 'NX', now_us, id)
  redis.call('EXPIRE', ended, terminal_ttl)
  local excess = redis.call('ZCARD', ended) - bound
  if excess > 0 then
    local popped = redis.call('ZPOPMIN', ended, excess)
    for i = 1, #popped, 2 do
      redis.call('DEL', base .. ':job:' .. popped[i], base .. ':job:' .. popped[i] .. ':h')
    end
  end
end
