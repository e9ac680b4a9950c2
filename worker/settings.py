"""Worker settings: the ONLY module of tokenfleet that reads environment variables.

Each setting has a default, an environment variable `TOKENFLEET_<NAME>` and a help text;
precedence is command line > environment > default. `deploy/ENV.md` is generated from this
table (`tokenfleet settings --markdown`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = ["ENV_PREFIX", "SettingsError", "WorkerSettings", "default_cache_dir"]

ENV_PREFIX: Final = "TOKENFLEET_"


class SettingsError(ValueError):
    """A setting has an invalid value (names the setting and its env var)."""


def _setting(default: Any, help: str, *, choices: tuple[str, ...] = ()) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """~/.cache/tokenfleet (or $XDG_CACHE_HOME/tokenfleet)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokenfleet"


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker (and the CLI) can be configured with."""

    engine: str = _setting("llm", "engine implementation: the real LLM engine or a simulated "
                           "one (fixed step time, deterministic tokens; tests/benchmarks)",
                           choices=("llm", "simulated"))
    model: str = _setting("smollm2", "model alias, HF directory or .gguf file to serve")
    redis_url: str | None = _setting(None, "Redis/Valkey URL; unset = start an embedded Valkey "
                                     "(AOF on) under cache_dir")
    cache_dir: Path | None = _setting(  # noqa: RUF009 (a field() carrying help metadata)
        None, "models and embedded Valkey data (default ~/.cache/tokenfleet)")
    queue: str = _setting("default", "queue (stream) this worker serves")
    key_prefix: str = _setting("tf", "namespace prefix of every Redis key")
    worker_id: str | None = _setting(None, "consumer name in the group (default host-pid-random)")
    device: str = _setting("auto", "torch device: auto, cpu, cuda, cuda:N")
    dtype: str = _setting("bfloat16", "weights/activations dtype",
                          choices=("bfloat16", "float16", "float32"))
    max_num_seqs: int = _setting(32, "most sequences in the running batch")
    max_num_batched_tokens: int = _setting(2048, "token budget of one engine step")
    kv_cache_bytes: int | None = _setting(None, "KV cache size in bytes (default: engine picks)")
    num_kv_blocks: int | None = _setting(None, "KV cache size in blocks (overrides bytes)")
    block_size: int = _setting(16, "tokens per KV cache block")
    num_threads: int | None = _setting(None, "CPU intra-op threads (default: torch's choice)")
    quantize: str = _setting("none", "weight quantization: none, int8 or int4 (weight-only; "
                             "CPU with dtype bfloat16; int4 = Q4_1's grid, 32-channel groups)",
                             choices=("none", "int8", "int4"))
    cpu_compile: bool = _setting(False, "CPU: run decode steps through torch.compile "
                                 "(int4 decode ~1.5x faster, bf16 ~1.2x; compiles for ~1.5 min "
                                 "at start-up, ~3.5 in bf16 without the GEMM kernel); ignored "
                                 "on CUDA, which replays CUDA graphs")
    cpu_attention_kernel: bool = _setting(True, "CPU: attention (decodes, and prompts up to "
                                          "4,096 keys) in a C kernel built at start-up with "
                                          "the system C compiler (~1 s; without one, torch's "
                                          "gather + SDPA path)")
    cpu_sampler_kernel: bool = _setting(True, "CPU: the sampler's argmax + logsumexp in a C "
                                        "kernel built the same way (without a compiler, "
                                        "torch's ops)")
    cpu_gemm_kernel: bool = _setting(True, "CPU: linears in C GEMM kernels built the same way, "
                                     "on CPUs with AVX-512 BF16 (bf16 decode GEMMs 1.2-1.4x faster "
                                     "than oneDNN, int4/int8 1.4-2.7x faster than torch's; "
                                     "elsewhere, or off, oneDNN and torch's)")
    attention_backend: str = _setting("auto", "attention kernels: auto (triton on CUDA, torch on "
                                      "CPU), torch, triton, flash_attn (needs flash-attn and "
                                      "block_size 256)",
                                      choices=("auto", "torch", "triton", "flash_attn"))
    gpu_memory_utilization: float = _setting(0.90, "CUDA: fraction of GPU memory the worker may "
                                             "fill (weights + KV cache) when kv_cache_bytes and "
                                             "num_kv_blocks are unset")
    cuda_graph_max_batch: int = _setting(128, "CUDA: decode batches up to this size replay "
                                         "CUDA graphs (capped at max_num_seqs); 0 = eager")
    async_decode: bool = _setting(True, "CUDA graphs: queue the next decode step before "
                                  "reading this one's tokens, overlapping host work with the "
                                  "GPU")
    speculate: int = _setting(0, "speculative decoding (TGI's --speculate): up to this many "
                              "draft tokens a step per decoding sequence, from n-gram lookup "
                              "in its own prompt and output, verified in one forward; the same "
                              "tokens as without it, in fewer steps where the answer repeats "
                              "its context; 0 = off (at most 16)")
    gc_freeze: bool = _setting(True, "`tokenfleet worker`: once the engine is built and "
                               "warm, move the heap made so far out of Python's garbage "
                               "collector (gc.freeze), so that its oldest-generation passes "
                               "skip the model, tokenizer and graphs instead of pausing "
                               "every stream for them")
    tensor_parallel_size: int = _setting(1, "split each layer across this many processes "
                                         "(one GPU each on CUDA: cuda:0..N-1 from --device; "
                                         "CPU cores shared on CPU); heads, MLP and vocabulary "
                                         "split, two all-reduces a layer")
    gateway_max_best_of: int = _setting(8, "gateway: most answers one request may ask for "
                                        "(TGI best_of, OpenAI n; each is a job of its own in "
                                        "the fleet, so this bounds one request's share); "
                                        "TGI's --max-best-of, whose default is 2; at most 64")
    owner_ttl_s: float = _setting(10.0, "a gateway keeps a liveness key with this TTL "
                                  "(refreshed every third of it); a worker cancels the jobs "
                                  "it sent without an Idempotency-Key once that key has been "
                                  "gone this long: the gateway died and nobody reads them; "
                                  "0 = off")
    lease_ms: int = _setting(30_000, "a job whose worker is silent this long is reclaimed; "
                             "leases are renewed every lease_ms/3")
    max_deliveries: int = _setting(3, "deliveries of one job before it is dead-lettered")
    drain_timeout_s: float = _setting(30.0, "on SIGTERM, time to finish in-flight requests")
    result_ttl_s: int = _setting(3_600, "lifetime of a request's result key")
    events_ttl_s: int = _setting(3_600, "lifetime of a request's replay stream")
    events_maxlen: int = _setting(10_000, "approximate cap of a replay stream's length")
    max_queue_len: int = _setting(0, "admission limit on the queue backlog published for "
                                  "producers; 0 = unlimited")
    read_block_ms: int = _setting(1_000, "XREADGROUP BLOCK time; bounds shutdown latency")
    lane_max_wait_s: float = _setting(0.0, "a job that waited this long in the normal or low "
                                      "lane is pulled before younger jobs of higher lanes, "
                                      "oldest first, in up to half of the slots (aging); 0 = "
                                      "strict priority, where a lower lane may wait as long "
                                      "as higher ones are busy")
    metrics_port: int = _setting(0, "Prometheus /metrics port; 0 = off")
    metrics_host: str = _setting("0.0.0.0", "address the metrics endpoint binds")
    gateway_host: str = _setting("127.0.0.1", "address the HTTP gateway binds (0.0.0.0 in a "
                                 "container)")
    gateway_port: int = _setting(8080, "HTTP gateway port; 0 = any free port")
    gateway_api_key: str | None = _setting(None, "HTTP gateway: require `Authorization: Bearer "
                                           "<key>` on every route but /health; unset = open")
    gateway_timeout_s: float | None = _setting(None, "HTTP gateway: answer 504 after this long, "
                                               "and cancel the request (workers will not start "
                                               "it later); unset = wait as long as it takes")
    gateway_default_max_tokens: int = _setting(1_024, "HTTP gateway: max_tokens of an OpenAI "
                                               "request that sets none")
    log_format: str = _setting("auto", "log output: JSON when not a TTY, pretty on a TTY",
                               choices=("auto", "json", "console"))
    log_level: str = _setting("info", "log level",
                              choices=("debug", "info", "warning", "error"))
    sim_step_ms: float = _setting(20.0, "simulated engine: duration of one step")
    sim_vocab_size: int = _setting(32_000, "simulated engine: vocabulary size")
    sim_max_model_len: int = _setting(4_096, "simulated engine: context length")
    test_hooks: bool = _setting(False, "TESTS ONLY: honour the fault-injection markers of "
                                "worker/test_hooks.py (a job carrying the kill marker SIGKILLs "
                                "the worker that starts it); never in production")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata["choices"]
            if choices and value not in choices:
                raise SettingsError(f"{_describe(f.name)} must be one of {choices}, got {value!r}")
        positive = ("max_num_seqs", "max_num_batched_tokens", "block_size", "lease_ms",
                    "max_deliveries", "result_ttl_s", "events_ttl_s", "events_maxlen",
                    "read_block_ms", "sim_vocab_size", "sim_max_model_len",
                    "tensor_parallel_size", "gateway_default_max_tokens",
                    "gateway_max_best_of")
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{_describe(name)} must be > 0, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise SettingsError(f"{_describe('gpu_memory_utilization')} must be in (0, 1]")
        for name in ("drain_timeout_s", "max_queue_len", "sim_step_ms", "cuda_graph_max_batch",
                     "lane_max_wait_s", "owner_ttl_s", "speculate"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{_describe(name)} must be >= 0, got {getattr(self, name)}")
        if 0 < self.owner_ttl_s < 1:
            raise SettingsError(f"{_describe('owner_ttl_s')} must be 0 (off) or at least 1 s, "
                                f"got {self.owner_ttl_s}")
        self._check_gateway()

    def _check_gateway(self) -> None:
        for name in ("metrics_port", "gateway_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise SettingsError(f"{_describe(name)} must be a port number")
        if self.gateway_api_key is not None and not self.gateway_api_key.strip():
            raise SettingsError(f"{_describe('gateway_api_key')} is empty: unset it to run "
                                "without a key")
        if self.gateway_timeout_s is not None and self.gateway_timeout_s <= 0:
            raise SettingsError(f"{_describe('gateway_timeout_s')} must be > 0")
        if self.gateway_max_best_of > 64:
            raise SettingsError(f"{_describe('gateway_max_best_of')} must be <= 64")
        if self.speculate > 16:  # engine.config.MAX_SPECULATE (no torch import here)
            raise SettingsError(f"{_describe('speculate')} must be <= 16")

    # -- derived --------------------------------------------------------------------------
    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else default_cache_dir()

    @property
    def resolved_worker_id(self) -> str:
        if self.worker_id:
            return self.worker_id
        return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    @property
    def heartbeat_s(self) -> float:
        return self.lease_ms / 3 / 1000

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Defaults, then `TOKENFLEET_*` variables, then `overrides` (None values ignored)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(env_var(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_args(cls, args: argparse.Namespace,
                  environ: Mapping[str, str] | None = None) -> WorkerSettings:
        """Merge parsed command-line options (added by `add_arguments`) over the environment."""
        names = {f.name for f in dataclasses.fields(cls)}
        overrides = {k: v for k, v in vars(args).items() if k in names}
        return cls.from_env(environ, **overrides)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser,
                      names: Iterable[str] | None = None) -> None:
        """Add `--<name>` options (default None = not given) documenting env var and default."""
        wanted = None if names is None else set(names)
        for f in dataclasses.fields(cls):
            if wanted is not None and f.name not in wanted:
                continue
            help_text = (f"{f.metadata['help']} [env {env_var(f.name)}; "
                         f"default {f.default!r}]").replace("%", "%%")
            kwargs: dict[str, Any] = {"default": None, "help": help_text,
                                      "type": lambda raw, n=f.name, t=f.type: _parse(n, t, raw)}
            if f.metadata["choices"]:
                kwargs["choices"] = f.metadata["choices"]
            parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)

    @classmethod
    def markdown_table(cls) -> str:
        """The env reference: one row per setting."""
        rows = ["| env var | default | description |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = "unset" if f.default is None else f"`{f.default}`"
            choices = f" ({', '.join(f.metadata['choices'])})" if f.metadata["choices"] else ""
            rows.append(f"| `{env_var(f.name)}` | {default} | {f.metadata['help']}{choices} |")
        return "\n".join(rows) + "\n"


def env_var(name: str) -> str:
    """The environment variable of a setting."""
    return ENV_PREFIX + name.upper()


def _describe(name: str) -> str:
    return f"{name} ({env_var(name)})"


def _parse(name: str, type_name: Any, raw: str) -> Any:
    """Parse a string for a field whose annotation is `type_name` (a string: PEP 563)."""
    base = str(type_name).replace(" | None", "")
    try:
        if base == "int":
            return int(raw)
        if base == "float":
            return float(raw)
        if base == "Path":
            return Path(raw).expanduser()
        if base == "bool":
            if raw.lower() not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
                raise ValueError(raw)
            return raw.lower() in {"1", "true", "yes", "on"}
    except ValueError:
        raise SettingsError(f"{_describe(name)}: cannot parse {raw!r} as {base}") from None
    return raw
