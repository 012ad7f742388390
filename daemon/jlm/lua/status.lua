-- status.lua: one consistent read of a job and its history.
--
-- KEYS[1]  job hash
-- KEYS[2]  job history list
--
-- Returns {fields (flat HGETALL list), history (list of JSON entries)}; both empty when the job
-- does not exist.

return {redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}
