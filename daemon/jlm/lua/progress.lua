-- progress.lua: store the latest progress of a running job, only for the run that holds it.
--
-- KEYS[1]  job hash            fields written here: progress (JSON {fraction, message, at}),
--                              progress_event_ms (when a job.progress event was last allowed)
-- ARGV[1]  worker id           must be the job's `owner`
-- ARGV[2]  claim sequence      must be the job's `claim`
-- ARGV[3]  progress            JSON {"fraction": 0..1, "message": "...", "at": RFC 3339}
-- ARGV[4]  event interval      ms: at most one job.progress event per job per interval
--
-- Returns a JSON object: o = stored (emit: true when this one is to be published as a
-- job.progress event) or refused, with state: a run that no longer holds the job, a job that is
-- not running, or one superseded while it runs (its progress, like its late result, concerns no
-- one: the scope has moved on) is refused and nothing is written.

local owner, claim, progress, interval = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])

local j = redis.call('HMGET', KEYS[1], 'state', 'owner', 'claim', 'superseded_by',
  'progress_event_ms')
if not j[1] or j[1] ~= 'running' or j[2] ~= owner or j[3] ~= claim or j[4] then
  return cjson.encode({o = 'refused', state = j[1] or 'unknown', superseded_by = j[4] or nil})
end
local _, now_ms = server_time()
local emit = now_ms - tonumber(j[5] or '0') >= interval
redis.call('HSET', KEYS[1], 'progress', progress)
if emit then
  redis.call('HSET', KEYS[1], 'progress_event_ms', now_ms)
end
return cjson.encode({o = 'stored', state = 'running', emit = emit})
