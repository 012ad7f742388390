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

local owner, claim, lease_ms = ARGV[1], ARGV[2], ARGV[3]

local j = redis.call('HMGET', KEYS[1], 'state', 'owner', 'claim')
if not j[1] then
  return {'unknown', 0}
end
if j[2] ~= owner or j[3] ~= claim then
  if j[1] == 'running' then
    return {'lost', 0}
  end
  return {j[1], 0}
end
if j[1] ~= 'running' then
  return {j[1], 0}
end
local _, now_ms = server_time()
local lease_until = now_ms + tonumber(lease_ms)
redis.call('HSET', KEYS[1], 'lease_until', lease_until)
return {'running', lease_until}
