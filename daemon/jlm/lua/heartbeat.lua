-- heartbeat.lua: renew the lease of a running job, only for the run that holds it.
--
-- KEYS[1]  job hash
-- ARGV[1]  worker id           the job's `owner`
-- ARGV[2]  claim sequence      the job's `claim`, as returned by claim.lua
-- ARGV[3]  lease               milliseconds; the new deadline is Redis TIME + lease
--
-- Returns {state, lease_until}: state is `running` when the lease was renewed (lease_until in ms);
-- else the job's state (`cancelled` is how a cancellation missed on pub/sub is still seen),
-- `lost` when the job runs under another claim, or `unknown` when the job is gone; lease_until 0.

local j = redis.call('HMGET', KEYS[1], 'state', 'owner', 'claim')
if not j[1] then
  return {'unknown', 0}
end
if j[2] ~= ARGV[1] or j[3] ~= ARGV[2] then
  if j[1] == 'running' then
    return {'lost', 0}
  end
  return {j[1], 0}
end
if j[1] ~= 'running' then
  return {j[1], 0}
end
local t = redis.call('TIME')
local lease_until = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'lease_until', lease_until)
return {'running', lease_until}
