"""Read new jobs from a queue's priority lanes in order: high, normal, low.

Each lane gets only the free slots the lanes before it left. Strict priority can starve the
lower lanes under sustained load; with `lane_max_wait_ms` a job that has waited that long
is pulled before younger jobs of higher lanes (aging), so every job's wait is bounded. Aged
jobs take at most half of the slots a worker fills (alternating when it fills one at a
time): the rest follow priority, so under sustained overload the high lane is not starved
by an old backlog in turn.

One Lua call reads them all without blocking (three XREADGROUPs in one round trip: a worker
pulls at every step that frees a slot, and three round trips each time cost it measurable
CPU and latency); when every lane is empty, one XREADGROUP blocks on all three at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from tokenfleet.producer.keys import LANES, Keys
from tokenfleet.worker.script_reply import as_bytes, field_map

__all__ = ["LaneEntry", "LaneReader"]

# KEYS: the lanes' streams, in priority order. ARGV: group, consumer, count, max_wait_ms,
# max_aged. Returns {{lane number, entries} | {lane number, error text}, …}: a lane whose
# group is missing reports NOGROUP without losing what the lanes before it delivered.
# With max_wait_ms > 0, up to max_aged of the entries read are lower-lane entries that have
# waited that long (a stream id is the server's clock when it was added), oldest first; the
# rest follow the priority order.
READ_LANES_LUA: Final = """
local group, consumer = ARGV[1], ARGV[2]
local remaining = tonumber(ARGV[3])
local max_wait_ms = tonumber(ARGV[4])
local out = {}
local function read(i, count)
  local reply = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count,
                            'STREAMS', KEYS[i], '>')
  if type(reply) == 'table' and reply.err then
    table.insert(out, {i, reply.err})
  elseif reply then
    remaining = remaining - #reply[1][2]
    table.insert(out, {i, reply[1][2]})
  end
end
local function last_delivered(key)
  local groups = redis.pcall('XINFO', 'GROUPS', key)
  if type(groups) ~= 'table' or groups.err then return nil end
  for _, g in ipairs(groups) do
    local name, last
    for j = 1, #g, 2 do
      if g[j] == 'name' then name = g[j + 1] elseif g[j] == 'last-delivered-id' then
        last = g[j + 1] end
    end
    if name == group then return last end
  end
  return nil
end
local function id_key(id)
  local ms, seq = string.match(id, '(%d+)-(%d+)')
  return tonumber(ms), tonumber(seq)
end
local max_aged = math.min(tonumber(ARGV[5]), remaining)
if max_wait_ms > 0 and max_aged > 0 then
  local now = redis.call('TIME')
  -- %d: some servers print a large Lua number in scientific notation, which XRANGE refuses
  local cutoff = string.format('%d', tonumber(now[1]) * 1000
                               + math.floor(tonumber(now[2]) / 1000) - max_wait_ms)
  local overdue = {}
  for i = 2, #KEYS do
    local last = last_delivered(KEYS[i])
    if last then
      for _, e in ipairs(redis.call('XRANGE', KEYS[i], '(' .. last, cutoff,
                                    'COUNT', max_aged)) do
        local ms, seq = id_key(e[1])
        table.insert(overdue, {ms, seq, i})
      end
    end
  end
  table.sort(overdue, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return a[2] < b[2]
  end)
  local take = {}
  for n = 1, math.min(max_aged, #overdue) do
    take[overdue[n][3]] = (take[overdue[n][3]] or 0) + 1
  end
  for i = 2, #KEYS do
    if take[i] then read(i, take[i]) end
  end
end
for i = 1, #KEYS do
  if remaining <= 0 then break end
  read(i, remaining)
end
return out
"""


@dataclass(frozen=True, slots=True)
class LaneEntry:
    """One job read from a lane: its entry id (ids are per stream) and fields."""

    lane: str
    entry_id: bytes
    fields: Mapping[bytes, bytes]


class LaneReader:
    """Reads for one consumer of one queue; `on_missing_group` recreates the groups."""

    def __init__(self, redis: Redis, keys: Keys, queue: str, consumer: str,
                 read_block_ms: int, lane_max_wait_ms: int = 0) -> None:
        self.streams = {lane: keys.jobs(queue, lane) for lane in LANES}
        self._redis = redis
        self._group = keys.group(queue)
        self._consumer = consumer
        self._read_block_ms = read_block_ms
        self._lane_max_wait_ms = lane_max_wait_ms
        self._aged_turn = True  # one free slot: aged entries may take every other one
        self._lane_of = {stream.encode(): lane for lane, stream in self.streams.items()}
        self._script = redis.register_script(READ_LANES_LUA)

    async def read(self, num_free: int) -> tuple[list[LaneEntry], bool]:
        """Up to `num_free` new entries in priority order, and whether a lane's group was
        missing. When every lane is empty, blocks until one gets an entry. That read takes
        at most one per lane, and one when it really blocked (Redis serves a blocked reader
        after each command; the admission script adds one entry); two or three, beyond the
        free slots, only if entries reached several lanes in the moment between the script
        and the blocking read."""
        max_aged = num_free // 2 + (num_free % 2 if self._aged_turn else 0)
        if num_free % 2:
            self._aged_turn = not self._aged_turn
        reply: Any = await self._script(keys=list(self.streams.values()),
                                        args=[self._group, self._consumer, num_free,
                                              self._lane_max_wait_ms, max_aged])
        out: list[LaneEntry] = []
        missing_group = False
        refused: ResponseError | None = None
        for lane_number, entries in reply or []:
            lane = LANES[int(lane_number) - 1]
            if isinstance(entries, bytes | str):  # an error, usually: the lane's group is gone
                if "NOGROUP" in _text(entries):
                    missing_group = True
                else:
                    refused = ResponseError(_text(entries))
                continue
            out += [LaneEntry(lane, as_bytes(entry_id), field_map(flat))
                    for entry_id, flat in entries]
        if refused is not None and not out:
            raise refused  # after delivering what other lanes gave: it would strand them
        if out or missing_group:
            return out, missing_group
        blocked: Any = await self._redis.xreadgroup(
            self._group, self._consumer, dict.fromkeys(self.streams.values(), ">"),
            count=1, block=self._read_block_ms)
        out = [LaneEntry(self._lane_of[as_bytes(stream)], entry_id, fields)
               for stream, entries in blocked or [] for entry_id, fields in entries]
        return sorted(out, key=lambda e: LANES.index(e.lane)), False


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
