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
