-- add_due.lua: a scheduled job's entry in its due set (after its decision, in manage.lua, which
-- cannot reach this key: it has another hash tag).
--
-- KEYS[1]  due set     sorted set: job id -> due time (ms since the epoch)
-- ARGV[1]  job id
-- ARGV[2]  due         ms; an entry with an earlier time than the job's is harmless (promote.lua
--                      finds the job not due and the scheduler puts it back with its time)
--
-- Returns 1.

local job_id, due = ARGV[1], ARGV[2]

redis.call('ZADD', KEYS[1], due, job_id)
return 1
