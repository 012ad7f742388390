-- record.lua: the prelude of the scripts that record a decision (manage, cancel, invalidate).
--
-- A request with a message_id has an idempotency key, (actor, message_id), bound to one request by
-- the request's digest (operation, actor, canonical body). Two keys hold it:
--   binding  string under a hash tag derived from the idempotency key: the digest it is bound to.
--            It sees the key whatever the scope. On one Redis the script sets it (bind = 1); on a
--            Redis Cluster it lives in another slot, so bind.lua has set it in a call of its own
--            before the decision (bind = 0, and the key passed is a slot-mate placeholder).
--   record   hash under the scope's hash tag, named by the idempotency key:
--            dg (the digest), f (the decision's facts, JSON), ok (1 once the broker confirmed the
--            decision's job and events; the daemon marks it after the fact, outside the scripts),
--            rp (the broker session that last took on publishing the decision again).
-- Nothing is written for a request that is refused or finds nothing to decide.

-- 'new', 'conflict', or 'replay' with the recorded facts and the ok flag.
local function lookup(binding, record, digest, bind)
  if bind == '1' then
    local bound = redis.call('GET', binding)
    if bound and bound ~= digest then
      return 'conflict'
    end
  end
  local r = redis.call('HMGET', record, 'dg', 'f', 'ok')
  if r[1] then
    if r[1] ~= digest then
      return 'conflict'
    end
    return 'replay', r[2], r[3] or false
  end
  return 'new'
end

-- Whether a replay publishes the decision's job and events again: only for a redelivered
-- message (session is then the daemon's broker session, else ''), only while no publish was
-- confirmed, and once per session: every delivery a session holds is redelivered together if the
-- session dies before its publish is confirmed.
local function take_republish(record, ok, session)
  if ok or session == '' or redis.call('HGET', record, 'rp') == session then
    return 0
  end
  redis.call('HSET', record, 'rp', session)
  return 1
end

local function save(binding, record, digest, bind, facts, ttl)
  if bind == '1' then
    redis.call('SET', binding, digest, 'EX', ttl)
  end
  redis.call('HSET', record, 'dg', digest, 'f', facts)
  redis.call('EXPIRE', record, ttl)
end


-- The prologue of a recording script: nil when the request is to be decided now (no message_id,
-- or a new one); else the script's reply, {2, ''} for a conflict or {1, facts, result, job state,
-- republish} for a replay. `replay_extra(facts)`, if given, reads a replay's result and job state.
local function recorded(record_it, binding, record, digest, bind, session, replay_extra)
  if record_it ~= '1' then
    return nil
  end
  local seen, facts, ok = lookup(binding, record, digest, bind)
  if seen == 'conflict' then
    return {2, ''}
  elseif seen == 'replay' then
    local result, state = false, false
    if replay_extra then
      result, state = replay_extra(facts)
    end
    return {1, facts, result, state, take_republish(record, ok, session)}
  end
  return nil
end
