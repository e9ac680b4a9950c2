"""A snapshot of the fleet for `tokenfleet status`: live workers and each queue's backlog."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from tokenfleet.producer.keys import LANES, Keys
from tokenfleet.producer.protocol import WorkerInfo, decode_worker_info

__all__ = ["FleetStatus", "QueueStatus", "fleet_status", "live_workers"]


@dataclass(slots=True)
class QueueStatus:
    """One queue, all priority lanes summed: `backlog` = not yet delivered (lag), `pending` =
    delivered, not acked; `backlog_by_lane` splits the backlog by lane."""

    queue: str
    length: int
    backlog: int
    pending: int
    num_consumers: int
    num_dead: int
    max_queue_len: int
    backlog_by_lane: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class FleetStatus:
    workers: list[WorkerInfo] = field(default_factory=list)
    queues: list[QueueStatus] = field(default_factory=list)


async def fleet_status(redis: Redis, keys: Keys, queues: Iterable[str] = ()) -> FleetStatus:
    """Read every live worker's heartbeat and the status of their queues (plus `queues`)."""
    status = FleetStatus(workers=await live_workers(redis, keys))
    names = set(queues) | {w.queue for w in status.workers if w.queue}
    names |= await _queues_with_streams(redis, keys)
    for queue in sorted(names):
        status.queues.append(await _queue_status(redis, keys, queue))
    return status


async def live_workers(redis: Redis, keys: Keys) -> list[WorkerInfo]:
    """Every worker whose heartbeat has not expired, sorted by id."""
    workers = []
    async for key in redis.scan_iter(match=keys.workers_pattern(), count=500):
        data = await redis.get(key)
        if data is None:
            continue  # expired between SCAN and GET
        try:
            workers.append(decode_worker_info(data))
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
    workers.sort(key=lambda w: w.worker_id)
    return workers


async def _queues_with_streams(redis: Redis, keys: Keys) -> set[str]:
    found = set()
    prefix = f"{keys.prefix}:{{"
    async for raw in redis.scan_iter(match=f"{prefix}*}}:jobs*", count=500):
        key = raw.decode() if isinstance(raw, bytes) else raw
        queue, _, rest = key[len(prefix):].rpartition("}:")
        if queue and rest in {"jobs", *(f"jobs:{lane}" for lane in LANES)}:
            found.add(queue)  # any lane's stream names the queue
    return found


async def _queue_status(redis: Redis, keys: Keys, queue: str) -> QueueStatus:
    status = QueueStatus(queue=queue, length=0, backlog=0, pending=0, num_consumers=0,
                         num_dead=await redis.xlen(keys.dead(queue)), max_queue_len=0)
    for lane in LANES:
        length, backlog, pending, num_consumers = await _lane_status(redis, keys, queue, lane)
        status.length += length
        status.backlog += backlog
        status.pending += pending
        status.num_consumers = max(status.num_consumers, num_consumers)
        status.backlog_by_lane[lane] = backlog
    limit = await redis.hget(keys.limits(queue), "max_queue_len")
    status.max_queue_len = int(limit or 0)
    return status


async def _lane_status(redis: Redis, keys: Keys, queue: str,
                       lane: str) -> tuple[int, int, int, int]:
    """(length, backlog, pending, consumers) of one lane's stream."""
    jobs = keys.jobs(queue, lane)
    length = await redis.xlen(jobs)
    backlog, pending, num_consumers = length, 0, 0
    try:
        groups = await redis.xinfo_groups(jobs)
    except ResponseError:  # no stream yet
        groups = []
    for group in groups:
        if _text(group["name"]) == keys.group(queue):
            pending = int(group["pending"])
            num_consumers = int(group["consumers"])
            lag = group.get("lag")
            backlog = int(lag) if lag is not None else length - pending
    return length, backlog, pending, num_consumers


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
