-- settle_due.lua: a scheduler is done with entries it took (take_due.lua).
--
-- KEYS[1]  due set     sorted set: job id -> due time (ms)
-- KEYS[2]  taken set   sorted set: job id -> lease deadline (ms); same hash tag as KEYS[1]
-- ARGV     pairs of (job id, due): due '' when the job was published or has nothing to publish;
--          else the job is not due yet (a debounce moved its time) and goes back to the due set.
--
-- Returns the number of entries settled.

for i = 1, #ARGV, 2 do
  redis.call('ZREM', KEYS[2], ARGV[i])
  if ARGV[i + 1] ~= '' then
    redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
  end
end
return #ARGV / 2
