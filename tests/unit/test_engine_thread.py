"""EngineThread: adds made inside `batched()` reach the engine together, aborts keep order."""

from __future__ import annotations

import asyncio

from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.engine.simulated_engine import SimulatedEngine
from tokenfleet.worker.engine_thread import EngineThread, StepResult


async def _results_until_finished(thread: EngineThread, ids: set[str]) -> list[StepResult]:
    results: list[StepResult] = []
    done: set[str] = set()
    async with asyncio.timeout(10):
        while done != ids:
            event = await thread.events.get()
            assert isinstance(event, StepResult), event
            results.append(event)
            done |= {o.request_id for o in event.outputs if o.finished}
    return results


async def test_batched_adds_start_in_one_step() -> None:
    engine = SimulatedEngine(max_num_seqs=8, step_time_s=0.01)
    thread = EngineThread(engine, asyncio.get_running_loop())
    thread.start()
    ids = {f"r{i}" for i in range(5)}
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    with thread.batched():
        for request_id in sorted(ids):
            thread.add(request_id, [1, 2, 3], params)
            await asyncio.sleep(0.02)  # one Redis round trip per job, longer than a step
    results = await _results_until_finished(thread, ids)
    first = next(r for r in results if r.outputs)
    assert {o.request_id for o in first.outputs} == ids  # every first token in one step
    await thread.stop()


async def test_abort_inside_a_batch_is_not_overtaken() -> None:
    engine = SimulatedEngine(max_num_seqs=8, step_time_s=0.01)
    thread = EngineThread(engine, asyncio.get_running_loop())
    thread.start()
    params = SamplingParams(max_new_tokens=50, ignore_eos=True)
    with thread.batched():
        thread.add("kept", [1, 2], params)
        thread.add("cancelled", [1, 2], params)
        thread.abort("cancelled")  # sent after its add, although the add was held
        thread.add("late", [1, 2], SamplingParams(max_new_tokens=2, ignore_eos=True))
    results = await _results_until_finished(thread, {"cancelled", "late"})
    finals = {o.request_id: o for r in results for o in r.outputs if o.finished}
    assert finals["cancelled"].finish_reason is not None
    assert finals["cancelled"].finish_reason.value == "cancelled"
    assert finals["late"].finish_reason.value == "length"
    assert results[-1].num_adds_applied == thread.num_adds_sent == 3
    thread.abort("kept")
    await _results_until_finished(thread, {"kept"})
    await thread.stop()


async def test_a_dead_engine_stops_the_thread_without_failing_its_requests() -> None:
    """EngineDeadError (a tensor-parallel rank died) is the worker's failure, not the
    requests': none is failed (the worker hands them to the fleet), and it is fatal at once,
    where other step errors fail the running requests and are fatal only when repeated."""
    from tokenfleet.engine.errors import EngineDeadError
    from tokenfleet.worker.engine_thread import EngineFailure

    for error, dead in ((EngineDeadError("rank 1 exited"), True), (RuntimeError("oops"), False)):
        engine = SimulatedEngine(max_num_seqs=8, step_time_s=0.01)

        def broken_step(error: Exception = error) -> list:
            raise error

        engine.step = broken_step  # type: ignore[method-assign]
        thread = EngineThread(engine, asyncio.get_running_loop())
        thread.start()
        thread.add("r0", [1, 2], SamplingParams(max_new_tokens=5, ignore_eos=True))
        async with asyncio.timeout(10):
            event = await thread.events.get()
            while not isinstance(event, EngineFailure):
                event = await thread.events.get()
        assert event.fatal is dead
        assert event.request_ids == ([] if dead else ["r0"])
        await thread.stop()
