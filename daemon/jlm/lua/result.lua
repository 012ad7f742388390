-- result.lua: read a scope's cached result.
--
-- KEYS[1]  result hash
--
-- Returns {job id, value (JSON), at}, each false when nothing is cached.

return redis.call('HMGET', KEYS[1], 'job', 'value', 'at')
