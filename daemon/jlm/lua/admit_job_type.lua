-- admit_job_type.lua: admit an unconfigured job type into the namespace's bounded set of types
-- that get a queue (max_job_types, all daemons together), atomically.
--
-- KEYS[1]  job-type set        members: the admitted unconfigured job types (no TTL)
-- ARGV[1]  job type
-- ARGV[2]  max_job_types
--
-- Returns 1 when the type is (or now is) admitted, 0 when the set is full without it.

local job_type, max_job_types = ARGV[1], tonumber(ARGV[2])

if redis.call('SISMEMBER', KEYS[1], job_type) == 1 then
  return 1
end
if redis.call('SCARD', KEYS[1]) >= max_job_types then
  return 0
end
redis.call('SADD', KEYS[1], job_type)
return 1
