-- Admission: enqueue a job unless the queue's backlog is at its limit (DESIGN §3.1).
-- One atomic call, so concurrent producers cannot overshoot the limit, and a retried
-- submit with the same request id does not enqueue twice.
--
-- KEYS[1] the job's lane stream   KEYS[2] limits hash   KEYS[3] idempotency key
-- KEYS[4..] every lane stream of the queue (the backlog counts them all); same slot
-- ARGV[1] consumer group   ARGV[2] max_queue_len (< 0: read limits hash; 0: no limit)
-- ARGV[3] job JSON         ARGV[4] idempotency TTL in seconds   ARGV[5] the job's lane
-- Returns {"queued", entry_id} | {"duplicate", "<lane>:<entry_id>" (or a bare entry id
-- recorded before lanes: the normal lane)} | {"overloaded", backlog}

local previous = redis.call('GET', KEYS[3])
if previous then
  return {'duplicate', previous}
end

local limit = tonumber(ARGV[2])
if limit < 0 then
  limit = tonumber(redis.call('HGET', KEYS[2], 'max_queue_len') or '0') or 0
end

if limit > 0 then
  -- Backlog = entries not yet delivered to a worker, over every lane. Delivered entries
  -- stay in a stream (pending) until acked and deleted: subtract the group's pending count.
  local backlog = 0
  for i = 4, #KEYS do
    backlog = backlog + redis.call('XLEN', KEYS[i])
    local pending = redis.pcall('XPENDING', KEYS[i], ARGV[1])
    if type(pending) == 'table' and pending.err == nil then
      backlog = backlog - tonumber(pending[1])
    end
  end
  if backlog >= limit then
    return {'overloaded', tostring(backlog)}
  end
end

local entry_id = redis.call('XADD', KEYS[1], '*', 'job', ARGV[3])
-- The lane too: a retry may come with another priority, and entry ids are per stream.
redis.call('SET', KEYS[3], ARGV[5] .. ':' .. entry_id, 'EX', tonumber(ARGV[4]))
return {'queued', entry_id}
