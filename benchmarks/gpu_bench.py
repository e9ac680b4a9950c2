"""The timing half of benchmarks/gpu_check.py: HF `generate` and our engine, same shapes.

`bench_engine` reports each batch size with the defaults (CUDA graphs, asynchronous decode),
the largest batch twice (the spread between runs), then without asynchronous decode, then
batch 1 fully eager, then batch 1 with the other setting of `fused_decode_gemv` (the norms,
SiLU·mul and o_proj in our tuned GEMV), plus the GPU time of one graph replay and
torch-profiler tables of a batch-1 replay, the largest batch's prefill and a window of its
decode steps.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["bench_engine", "bench_hf", "bench_row_stats", "fused_gemv_graphs", "generate"]


def generate(engine: Any, prompts: list[list[int]], new_tokens: int, tag: str
              ) -> tuple[dict[str, list[Any]], list[tuple[float, int, int]]]:
    """Run prompts to completion; returns tokens per request and (seconds, tokens, firsts)."""
    from tokenfleet.engine import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    outputs: dict[str, list[Any]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}{i}", prompt, params)
        outputs[f"{tag}{i}"] = []
    steps = []
    while engine.has_unfinished():
        started = time.perf_counter()
        step = engine.step()
        elapsed = time.perf_counter() - started
        firsts = sum(1 for s in step if s.tokens and not outputs[s.request_id])
        for s in step:
            outputs[s.request_id].extend(s.tokens)
        steps.append((elapsed, sum(len(s.tokens) for s in step), firsts))
    return outputs, steps


def bench_row_stats(device: str, vocab: int, batches: tuple[int, ...]) -> list[dict[str, Any]]:
    """The sampler's argmax + logsumexp over bf16 logits: the Triton kernel vs the torch ops
    it replaced (a float32 copy, argmax, logsumexp)."""
    import torch

    from tokenfleet.engine.sampler import torch_row_stats
    from tokenfleet.kernels.attention_bench import time_ms
    from tokenfleet.kernels.row_stats import row_stats

    rows = []
    for n in batches:
        logits = (torch.randn(n, vocab, device=device) * 4).bfloat16()
        torch_ms = time_ms(lambda logits=logits: torch_row_stats(logits.float()), device)
        ours_ms = time_ms(lambda logits=logits: row_stats(logits), device)
        rows.append({"case": f"row_stats {n}x{vocab}", "torch_us": torch_ms * 1e3,
                     "ours_us": ours_ms * 1e3, "torch_over_ours": torch_ms / ours_ms})
    return rows


def bench_hf(hf: Any, plan: dict[str, Any]) -> dict[str, dict[str, float]]:
    import torch

    results = {}
    n, vocab = plan["bench_new_tokens"], plan["model"]["vocab_size"]
    for batch in plan["bench_batches"]:
        ids = torch.randint(3, vocab, (batch, plan["bench_prompt_len"]), device=plan["device"])
        run = lambda m, ids=ids: hf.generate(ids, attention_mask=torch.ones_like(ids),  # noqa: E731
                                             max_new_tokens=m, min_new_tokens=m,
                                             do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            run(4)  # warm-up
            _sync()
            started = time.perf_counter()
            run(n)
            _sync()
        seconds = time.perf_counter() - started
        results[str(batch)] = {"tok_s": batch * n / seconds, "ms_step": seconds / n * 1e3}
        print(f"HF batch {batch}: {results[str(batch)]}", flush=True)
    return results


def bench_engine(engine: Any, plan: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each batch size with the defaults (CUDA graphs, asynchronous decode), the largest
    twice, then without asynchronous decode, then batch 1 fully eager and with the other
    `fused_decode_gemv` setting: what each part contributes (module docstring)."""
    results = {}
    for batch in plan["bench_batches"]:
        results[str(batch)] = _bench_engine_batch(engine, plan, batch)
    largest = max(plan["bench_batches"])
    results[f"{largest} again"] = _bench_engine_batch(engine, plan, largest)
    graphs = engine.runner.graph_runner
    if graphs is not None and engine.config.async_decode:
        engine.config.async_decode = False  # the same steps, host work not overlapped
        try:
            for batch in plan["bench_batches"]:
                results[f"{batch} sync"] = _bench_engine_batch(engine, plan, batch)
        finally:
            engine.config.async_decode = True
    if graphs is not None:
        results["replay"] = _time_replays(graphs, plan)
        _profile_prefill(engine, plan)
        _profile_decode(engine, plan)
        engine.runner.graph_runner = None
        try:
            results["1 eager"] = _bench_engine_batch(engine, plan, 1)
        finally:
            engine.runner.graph_runner = graphs
        flipped = not engine.config.fused_decode_gemv
        results[f"1 fused-gemv {'on' if flipped else 'off'}"] = _bench_fused_gemv(
            engine, plan, flipped)
    return results


@contextlib.contextmanager
def fused_gemv_graphs(engine: Any, on: bool) -> Iterator[Any]:
    """The engine with `fused_decode_gemv` set to `on` for one-row steps, replayed from a
    batch-1 graph captured for it; as it was afterwards. Yields that graph runner."""
    import torch

    runner, config = engine.runner, engine.config
    graphs, max_batch = runner.graph_runner, config.cuda_graph_max_batch
    try:
        runner.set_fused_decode_gemv(on)
        config.cuda_graph_max_batch = 1  # capture the batch-1 graph only
        other = runner.make_graph_runner(use_graphs=True)
        with torch.cuda.device(runner.device):
            other.capture_all()
        runner.graph_runner = other
        yield other
    finally:
        runner.graph_runner = graphs
        config.cuda_graph_max_batch = max_batch
        runner.set_fused_decode_gemv(not on)


def _bench_fused_gemv(engine: Any, plan: dict[str, Any], on: bool) -> dict[str, Any]:
    """Batch 1 again with `fused_decode_gemv` set to `on` (each RMSNorm inside the GEMV after
    it, tiles tuned per shape). A failure is reported, not raised, so that the default path's
    numbers survive it."""
    from tokenfleet.kernels.norm_gemv import GEMV_TUNER

    try:
        with fused_gemv_graphs(engine, on) as other:
            result: dict[str, Any] = _bench_engine_batch(engine, plan, 1)
            result["replay_ms_b1"] = _replay_ms(other._replays[1])
            print(f"  replay GPU ms: {result['replay_ms_b1']:.3f}; tuned GEMV tiles: "
                  f"{GEMV_TUNER.report()}", flush=True)
            result["gemv_tiles"] = GEMV_TUNER.report()
            if on:
                _profile_replay(other._replays[1])
            return result
    except Exception as exc:  # the A/B is an extra: keep the rest of the report
        print(f"fused-gemv A/B failed: {exc!r}", flush=True)
        return {"error": repr(exc)}


def _time_replays(graphs: Any, plan: dict[str, Any]) -> dict[str, float]:
    """GPU time of one graph replay (the forward + lm_head alone, no host work), per batch."""
    out = {}
    for batch in plan["bench_batches"]:
        replay = graphs._replays.get(graphs.bucket_for(batch))
        if replay is not None:
            out[f"replay_ms_b{batch}"] = _replay_ms(replay)
    print(f"graph replay GPU time: {out}", flush=True)
    _profile_replay(graphs._replays[graphs.bucket_for(1)])
    return out


def _replay_ms(replay: Any) -> float:
    """Median GPU ms of one replay (CUDA events around it, 20 replays)."""
    import statistics

    import torch

    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _profile_decode(engine: Any, plan: dict[str, Any], num_steps: int = 8) -> None:
    """Kernel and host tables of `num_steps` decode steps of the largest batch, once every
    sequence is decoding: where a step's time goes beyond its graph replay."""
    import torch

    from tokenfleet.engine import SamplingParams

    batch, vocab = max(plan["bench_batches"]), plan["model"]["vocab_size"]
    params = SamplingParams(max_new_tokens=num_steps + 8, ignore_eos=True)
    try:  # a diagnostic: a failure here must not cost the measured numbers
        for i in range(batch):
            engine.add_request(f"profdec-{i}", torch.randint(
                3, vocab, (plan["bench_prompt_len"],)).tolist(), params)
        decoding: set[str] = set()
        while len(decoding) < batch and engine.has_unfinished():
            decoding.update(s.request_id for s in engine.step() if s.tokens)
        print(f"decode batch {batch}, {num_steps} steps:", flush=True)
        _print_profile(lambda: [engine.step() for _ in range(num_steps)],
                       ("cuda_time_total", "self_cpu_time_total"))
        while engine.has_unfinished():
            engine.step()
    except Exception as exc:
        print(f"decode profile failed: {exc!r}", flush=True)


def _profile_prefill(engine: Any, plan: dict[str, Any]) -> None:
    """Kernel table of the prefill steps of the largest batch (the steps before decode)."""
    import torch

    batch, vocab = max(plan["bench_batches"]), plan["model"]["vocab_size"]
    prompts = torch.randint(3, vocab, (batch, plan["bench_prompt_len"])).tolist()
    _print_profile(lambda: generate(engine, prompts, 1, "prof-"),
                   ("cuda_time_total", "cpu_time_total"))


def _print_profile(fn: Callable[[], Any], sort_keys: tuple[str, ...]) -> None:
    """Run `fn` under the torch profiler (CPU + CUDA); one table per sort key. A diagnostic:
    a profiler failure is printed, never raised."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        for key in sort_keys:
            print(prof.key_averages().table(sort_by=key, row_limit=16,
                                            max_name_column_width=60), flush=True)
    except Exception as exc:
        print(f"profiler unavailable: {exc!r}")


def _profile_replay(replay: Any) -> None:
    """Kernel time table of a batch-1 replay: where the time above the weight floor goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                replay()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18,
                                        max_name_column_width=70), flush=True)
    except Exception as exc:  # the profiler is a diagnostic: never fail the check over it
        print(f"profiler unavailable: {exc!r}")


def _bench_engine_batch(engine: Any, plan: dict[str, Any], batch: int) -> dict[str, float]:
    import statistics

    import torch

    n, vocab = plan["bench_new_tokens"], plan["model"]["vocab_size"]
    prompts = torch.randint(3, vocab, (batch, plan["bench_prompt_len"])).tolist()
    generate(engine, prompts, 4, f"warm{batch}-")  # compiles kernels of these shapes
    prompts = torch.randint(3, vocab, (batch, plan["bench_prompt_len"])).tolist()  # no cache hits
    started = time.perf_counter()
    _, steps = generate(engine, prompts, n, f"bench{batch}-")
    seconds = time.perf_counter() - started
    # Pure decode steps: after every sequence has produced its first token.
    seen, decode_s = 0, []
    for elapsed, _num_tokens, firsts in steps:
        if seen == batch:
            decode_s.append(elapsed)
        seen += firsts
    ms_step = statistics.median(decode_s) * 1e3 if decode_s else float("nan")
    print(f"  first steps (ms, tokens): {[(round(e * 1e3, 1), t) for e, t, _ in steps[:5]]}; "
          f"decode steps: {len(decode_s)}, {sum(decode_s):.3f} s of {seconds:.3f} s")
    result = {"tok_s": batch * n / seconds, "ms_step": ms_step,
              "decode_tok_s": batch / ms_step * 1e3, "num_steps": len(steps),
              "graphs": engine.runner.graph_runner is not None,
              "async_decode": engine.config.async_decode}
    print(f"engine batch {batch}: {result}", flush=True)
    return result


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
