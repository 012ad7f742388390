-- schedule.lua: how manage.lua holds a job back, for policy `debounce` and `not_before` (after
-- prelude.lua, record.lua; loaded with every recording script, called by manage.lua only). A held
-- job is `scheduled`; the daemon adds it to a due set (a key of another hash tag, so not here) and
-- its scheduler publishes it once due.
--
-- The schedule argument (manage.lua ARGV[25]) is '' or a JSON object:
--   db  debounce window, ms (policy debounce)   mw  max wait from the first request, ms
--   nb  not_before, ms since the epoch          p   the payload (JSON text), kept to publish later
-- A scheduled job's hash adds: due (ms since the epoch, Redis server time), payload, first (ms of
-- the first request of a debounce burst), and mw, nb when set.

local function schedule_of(arg)
  if arg == nil or arg == '' then
    return nil
  end
  return cjson.decode(arg)
end

-- When a new job is due, or nil when it is to be published now.
local function first_due(s, now_ms)
  if not s then
    return nil
  end
  local due = 0
  if s.db then
    due = now_ms + s.db
    if s.mw then
      due = math.min(due, now_ms + s.mw)
    end
  end
  if s.nb and s.nb > due then
    due = s.nb
  end
  if due <= now_ms then
    return nil
  end
  return due
end

-- A time in ms as an integer string: a Lua number may print in exponent form.
local function ms(n)
  return string.format('%d', n)
end

-- Seconds a scheduled job's keys live beyond the job TTL: its wait.
local function wait_s(due, now_ms)
  return math.max(0, math.ceil((due - now_ms) / 1000))
end

-- The fields of a new scheduled job, written after its ordinary ones.
local function hold(job, s, due, now_ms)
  redis.call('HSET', job, 'due', ms(due), 'payload', s.p, 'first', ms(now_ms))
  if s.mw then
    redis.call('HSET', job, 'mw', ms(s.mw))
  end
  if s.nb then
    redis.call('HSET', job, 'nb', ms(s.nb))
  end
end

-- A debounce request for a scope whose job is scheduled: the job takes the request's payload and
-- priority and its window restarts, bounded by the max wait from the burst's first request, never
-- before a not_before. Returns the job's new due time (ms, as an integer string).
local function debounce(job, s, now_ms, now, priority, ttl, bound)
  local j = redis.call('HMGET', job, 'first', 'mw', 'nb')
  local first = tonumber(j[1]) or now_ms
  local due = now_ms + s.db
  local mw = s.mw or tonumber(j[2])
  if mw then
    due = math.min(due, first + mw)
  end
  local nb = math.max(tonumber(j[3]) or 0, s.nb or 0)
  if nb > due then
    due = nb
  end
  redis.call('HSET', job, 'due', ms(due), 'payload', s.p, 'priority', priority, 'updated_at', now)
  if s.mw then
    redis.call('HSET', job, 'mw', ms(s.mw))
  end
  if nb > 0 then
    redis.call('HSET', job, 'nb', ms(nb))
  end
  redis.call('EXPIRE', job, ttl + wait_s(due, now_ms))
  note(job .. ':h', 'scheduled', now, 'debounced', bound, ttl + wait_s(due, now_ms))
  return ms(due)
end
