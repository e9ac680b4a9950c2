"""What `tokenfleet bench` reports: the summary (vLLM `bench serve` names), its table, the
JSON file, an optional PNG, and the live progress line.

Definitions (as in vLLM): TTFT = first token received - request sent; TPOT = (e2e - TTFT) /
(output tokens - 1), per request with more than one token; ITL = every gap between two
consecutive tokens of a request, pooled; throughputs count successful requests over the
whole benchmark duration. `event latency` is the time from a worker publishing an event to
this client receiving it, sampled on each request's first token and final events (fleet
runs only; the clocks must agree: see `RequestResult`).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, TextIO

from tokenfleet.worker.bench import BenchRun, RequestResult

__all__ = ["Progress", "format_table", "percentile", "plot", "summarize", "write_json"]

PERCENTILES: Final = (50, 90, 99)
_WIDTH: Final = 50
_METRICS: Final = (  # summary key, table title, row label
    ("ttft", "Time to First Token", "TTFT"),
    ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
    ("itl", "Inter-token Latency", "ITL"),
    ("e2el", "End-to-end Latency", "E2EL"),
    ("event_latency", "Event Latency (publish to receive)", "event latency"),
)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile with linear interpolation (numpy's default); nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _stats_ms(name: str, values_ms: Sequence[float]) -> dict[str, float]:
    out = {
        f"mean_{name}_ms": statistics.fmean(values_ms) if values_ms else math.nan,
        f"median_{name}_ms": percentile(values_ms, 50),
        f"std_{name}_ms": statistics.pstdev(values_ms) if values_ms else math.nan,
    }
    out.update({f"p{p}_{name}_ms": percentile(values_ms, p) for p in PERCENTILES})
    return out


def summarize(run: BenchRun, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The benchmark's numbers: counts, throughputs, and latency statistics in ms."""
    ok = [r for r in run.results if r.success]
    duration_s = run.duration_s
    num_input = sum(r.prompt_len for r in ok)
    num_output = sum(r.num_tokens for r in ok)
    summary: dict[str, Any] = {
        "meta": meta or {},
        "completed": len(ok),
        "failed": len(run.results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": num_input,
        "total_output_tokens": num_output,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": num_output / duration_s if duration_s > 0 else 0.0,
        "total_token_throughput": (num_input + num_output) / duration_s if duration_s else 0.0,
        "errors": sorted({r.error for r in run.results if r.error})[:10],
    }
    summary.update(_stats_ms("ttft", [r.ttft_s * 1000 for r in ok]))
    summary.update(_stats_ms("tpot", [r.tpot_s * 1000 for r in ok if r.num_tokens > 1]))
    summary.update(_stats_ms("itl", [gap * 1000 for r in ok for gap in r.itls_s]))
    summary.update(_stats_ms("e2el", [r.e2e_s * 1000 for r in ok]))
    latencies = [ms for r in ok for ms in r.event_latencies_ms]
    if latencies:
        summary.update(_stats_ms("event_latency", latencies))
    summary["throughput_timeline"] = _timeline(ok, run.start_s, duration_s)
    return summary


def _timeline(results: Sequence[RequestResult], start_s: float,
              duration_s: float) -> list[dict[str, float]]:
    """Output tokens/s received in windows of 1 s (a tenth of the run when it is shorter)."""
    width_s = min(1.0, max(duration_s, 1e-3) / 10)
    counts: dict[int, int] = {}
    for r in results:
        for t in r.token_times_s:
            window = int((t - start_s) / width_s)
            counts[window] = counts.get(window, 0) + 1
    return [{"t_s": w * width_s, "tok_s": counts.get(w, 0) / width_s}
            for w in range(max(counts, default=-1) + 1)]


def format_table(summary: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    """The vLLM `bench serve` table, with P90 rows and the event-latency section added."""
    lines = [f" {title} ".center(_WIDTH, "=")]

    def row(label: str, value: float | int) -> None:
        text = f"{value:<10}" if isinstance(value, int) else f"{value:<10.2f}"
        lines.append(f"{label + ':':<40} {text}".rstrip())

    row("Successful requests", summary["completed"])
    if summary["failed"]:
        row("Failed requests", summary["failed"])
    row("Benchmark duration (s)", summary["duration_s"])
    row("Total input tokens", summary["total_input_tokens"])
    row("Total generated tokens", summary["total_output_tokens"])
    row("Request throughput (req/s)", summary["request_throughput"])
    row("Output token throughput (tok/s)", summary["output_throughput"])
    row("Total Token throughput (tok/s)", summary["total_token_throughput"])
    for key, heading, label in _METRICS:
        if f"mean_{key}_ms" not in summary:
            continue
        lines.append(heading.center(_WIDTH, "-"))
        row(f"Mean {label} (ms)", summary[f"mean_{key}_ms"])
        row(f"Median {label} (ms)", summary[f"median_{key}_ms"])
        for p in PERCENTILES[1:]:
            row(f"P{p} {label} (ms)", summary[f"p{p}_{key}_ms"])
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def write_json(path: Path, summary: dict[str, Any], run: BenchRun) -> None:
    """The summary plus per-request arrays (seconds), like vLLM's `--save-result`."""
    rs = run.results
    data = dict(summary)
    data.update({
        "input_lens": [r.prompt_len for r in rs],
        "output_lens": [r.num_tokens for r in rs],
        "requested_output_lens": [r.output_len for r in rs],
        "ttfts": [r.ttft_s if r.token_times_s else None for r in rs],
        "e2els": [r.e2e_s if r.end_s else None for r in rs],
        "itls": [r.itls_s for r in rs],
        "event_latencies_ms": [r.event_latencies_ms for r in rs],
        "request_errors": [r.error for r in rs],
    })
    Path(path).write_text(json.dumps(_finite(data), indent=1, default=str) + "\n")


def _finite(value: Any) -> Any:
    """nan/inf -> None: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def plot(path: Path, summary: dict[str, Any], run: BenchRun) -> str:
    """Latency CDFs and throughput over time as a PNG; returns a message saying what it did.

    matplotlib is not a dependency: without it the plot is skipped (the JSON has the data).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    ok = [r for r in run.results if r.success]
    series = {"TTFT": [r.ttft_s * 1000 for r in ok],
              "TPOT": [r.tpot_s * 1000 for r in ok if r.num_tokens > 1],
              "ITL": [g * 1000 for r in ok for g in r.itls_s],
              "E2E": [r.e2e_s * 1000 for r in ok]}
    fig, (cdf, tput) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, values in series.items():
        if values:
            ordered = sorted(values)
            cdf.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=name)
    cdf.set(xscale="log", xlabel="latency (ms)", ylabel="fraction of samples",
            title="Latency CDFs")
    cdf.legend()
    cdf.grid(alpha=0.3)
    timeline = summary["throughput_timeline"]
    tput.plot([p["t_s"] for p in timeline], [p["tok_s"] for p in timeline])
    tput.set(xlabel="time (s)", ylabel="output tok/s", title="Throughput over time")
    tput.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"


class Progress:
    """A live progress line on stderr: rewritten in place on a TTY, every 10 % otherwise."""

    def __init__(self, total: int, *, label: str = "bench", stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and total > 0
        self.is_tty = self.stream.isatty()
        self.num_done = 0
        self.num_failed = 0
        self.num_tokens = 0
        self._start_s = time.perf_counter()
        self._last_s = 0.0
        self._last_decile = 0

    def start(self) -> None:
        """Restart the clock (call when the measured requests begin)."""
        self._start_s = time.perf_counter()

    def update(self, result: RequestResult) -> None:
        self.num_done += 1
        self.num_failed += 0 if result.success else 1
        self.num_tokens += result.num_tokens
        if not self.enabled:
            return
        now_s = time.perf_counter()
        decile = self.num_done * 10 // self.total
        if self.is_tty and (now_s - self._last_s > 0.1 or self.num_done == self.total):
            self._last_s = now_s
            self.stream.write("\r" + self._line(now_s))
            self.stream.flush()
        elif not self.is_tty and decile > self._last_decile:
            self._last_decile = decile
            self.stream.write(self._line(now_s) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.is_tty:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self, now_s: float) -> str:
        elapsed_s = max(now_s - self._start_s, 1e-9)
        failed = f", {self.num_failed} failed" if self.num_failed else ""
        return (f"[{self.label}] {self.num_done}/{self.total} requests{failed}  "
                f"{elapsed_s:.1f} s  {self.num_done / elapsed_s:.2f} req/s  "
                f"{self.num_tokens / elapsed_s:.1f} tok/s")
