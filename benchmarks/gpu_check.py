"""Everything a short GPU lease should check, in one run (about 8 minutes on an H100).

1. kernels: every Triton kernel vs its torch reference on random data (Llama-3-8B heads,
   bf16) and the paged-attention kernel timed against torch SDPA;
2. parity: our engine (triton attention) vs transformers on a random-weight Llama-3-8B-shaped
   model: next-token logits and greedy tokens for a few prompts;
3. bench: decode at batch 1 and 128 (128 prompt / 128 new tokens), transformers `generate`
   as the same-run baseline, with achieved weight bandwidth and the 3.0 TB/s floor.

Each part is guarded: one failing part is reported and the rest still run. A table is printed
last and everything goes to gpu_check.json in --out (default $OUT or /tmp).

    benchmarks/gpu_check.sh                  # on the lent GPU
    python benchmarks/gpu_check.py --dry-run # tiny shapes on the CPU (Triton interpreter)

The timing code lives in gpu_bench.py, the parity judgement in gpu_parity.py.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gpu_bench  # benchmarks/, beside this script
import gpu_parity

REPO = Path(__file__).resolve().parent.parent
COPY_TB_S = 3.0  # measured H100 copy bandwidth (DESIGN.md §6)

FULL = {
    "device": "cuda", "dtype": "bfloat16",
    "model": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                  max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5),
    "parity_prompt_lens": (7, 33, 130), "parity_new_tokens": 16,
    "bench_batches": (1, 128), "bench_prompt_len": 128, "bench_new_tokens": 128,
    # KV cache capped so that HF's copy of the weights fits beside the engine.
    "engine_args": dict(max_num_seqs=128, max_num_batched_tokens=8192,
                        kv_cache_bytes=12 * 2**30),
    "tie_nats": 0.25,
}
DRY = {
    "device": "cpu", "dtype": "float32",
    "model": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                  max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5),
    "parity_prompt_lens": (5, 9, 20), "parity_new_tokens": 6,
    "bench_batches": (1, 4), "bench_prompt_len": 8, "bench_new_tokens": 4,
    "engine_args": dict(max_num_seqs=8, num_kv_blocks=64),
    "tie_nats": 1e-3,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    parser.add_argument("--parts", default="kernels,parity,bench")
    args = parser.parse_args(argv)
    plan = DRY if args.dry_run else FULL
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    _ensure_importable()
    import torch

    torch.manual_seed(0)
    report: dict[str, Any] = {"plan": {k: v for k, v in plan.items() if k != "model"},
                              "versions": _versions(), "failures": []}
    parts = set(args.parts.split(","))
    if "kernels" in parts:
        _part(report, "kernels", lambda: _check_kernels(plan))
        _part(report, "attention_bench", lambda: _bench_attention(plan))
    if parts & {"parity", "bench"}:
        _part(report, "model", lambda: _run_model_parts(plan, parts, report))
    _print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nfailures: {report['failures'] or 'none'}; details in {args.out}/gpu_check.json")
    return 1 if report["failures"] else 0


def _part(report: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    """Run one part; record its result, or its failure, and go on."""
    started = time.perf_counter()
    print(f"\n=== {name}", flush=True)
    try:
        report[name] = fn()
    except Exception as exc:
        traceback.print_exc()
        report["failures"].append(f"{name}: {exc!r}")
    print(f"=== {name} done in {time.perf_counter() - started:.1f} s", flush=True)


def _ensure_importable() -> None:
    """Make `tokenfleet.*` importable from this checkout when it is not installed (device)."""
    try:
        import tokenfleet.kernels  # noqa: F401
    except ImportError:
        shim = Path(tempfile.mkdtemp(prefix="tokenfleet_path_")) / "tokenfleet"
        shim.mkdir()
        for sub in ("engine", "kernels", "worker", "producer"):
            (shim / sub).symlink_to(REPO / sub, target_is_directory=True)
        sys.path.insert(0, str(shim.parent))
    _stub_gguf_if_missing()


def _stub_gguf_if_missing() -> None:
    """The device image has no `gguf`; the engine imports it eagerly but this script never
    reads GGUF files, so a stub whose every attribute raises keeps the import chain working."""
    import importlib.util
    import types

    if importlib.util.find_spec("gguf") is not None:
        return

    def missing(name: str) -> Any:
        if name.startswith("__"):  # introspection (inspect, pickle) must see a plain module
            raise AttributeError(name)

        def fail(*_args: Any, **_kwargs: Any) -> Any:
            raise ImportError(f"gguf.{name}: the gguf package is not installed")
        return fail

    print("note: gguf not installed; using a stub (GGUF import is not exercised here)")
    for name in ("gguf", "gguf.quants"):
        stub = types.ModuleType(name)
        stub.__getattr__ = missing  # type: ignore[method-assign]
        sys.modules[name] = stub


def _versions() -> dict[str, str]:
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "missing"
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(out)
    return out


def _check_kernels(plan: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    from tokenfleet.kernels.selfcheck import LLAMA3_8B_SHAPE, TINY_SHAPE, run_kernel_checks

    runs = [(TINY_SHAPE, torch.float32), (TINY_SHAPE, torch.bfloat16)]
    if plan["device"] == "cuda":
        runs.append((LLAMA3_8B_SHAPE, torch.bfloat16))
    rows: list[dict[str, Any]] = []
    for shape, dtype in runs:
        label = "llama3-8b" if shape is LLAMA3_8B_SHAPE else "tiny"
        for r in run_kernel_checks(shape, dtype, plan["device"], seed=len(rows)):
            print(f"{'ok  ' if r.ok else 'FAIL'} {label:9s} {r.name:48s} rel_err={r.rel_err:.2e}"
                  f" (tol {r.tol:.0e}) {r.detail}")
            rows.append({"shape": label, "name": r.name, "rel_err": r.rel_err, "ok": r.ok})
    if not all(row["ok"] for row in rows):
        raise AssertionError("kernel check failed: " +
                             ", ".join(row["name"] for row in rows if not row["ok"]))
    return rows


def _bench_attention(plan: dict[str, Any]) -> list[dict[str, Any]]:
    from tokenfleet.kernels import norm_gemv_bench
    from tokenfleet.kernels.attention_bench import (
        CPU_CASES,
        bench_paged_attention,
        bench_rotary_store_kv,
    )

    if plan["device"] == "cuda":
        rows = (bench_paged_attention("cuda") + bench_rotary_store_kv("cuda")
                + norm_gemv_bench.bench_norm_gemv("cuda")
                + gpu_bench.bench_row_stats("cuda", plan["model"]["vocab_size"], (1, 128)))
    else:
        rows = (bench_paged_attention("cpu", heads=(4, 2, 16), cases=CPU_CASES)
                + bench_rotary_store_kv("cpu", heads=(4, 2, 16), batches=(2,))
                + norm_gemv_bench.bench_norm_gemv("cpu", norm_gemv_bench.CPU_CASES,
                                                  norm_gemv_bench.CPU_CONFIGS)
                + gpu_bench.bench_row_stats("cpu", plan["model"]["vocab_size"], (2,)))
    for row in rows:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def _run_model_parts(plan: dict[str, Any], parts: set[str], report: dict[str, Any]) -> None:
    """Random model → HF bf16 references and baseline → our engine (parity run, benchmark)
    → the same weights in float32 as the truth both sides are judged against."""
    import torch

    model_dir = Path(tempfile.mkdtemp(prefix="gpu_check_model_"))
    hf = _build_random_llama(plan, model_dir)
    report["weight_bytes"] = sum(p.numel() * p.element_size() for p in hf.parameters())
    prompts = [torch.randint(3, plan["model"]["vocab_size"], (n,)).tolist()
               for n in plan["parity_prompt_lens"]]
    n, dev = plan["parity_new_tokens"], plan["device"]
    theirs = gpu_parity.hf_bf16_reference(hf, prompts, n, dev) if "parity" in parts else None
    if "bench" in parts:
        _part(report, "hf_bench", functools.partial(gpu_bench.bench_hf, hf, plan))
    engine = _load_engine(plan, model_dir)  # HF stays loaded: it becomes the fp32 truth below
    ours = gpu_parity.engine_outputs(engine, prompts, n, gpu_bench.generate) if theirs else None
    # The other fused_decode_gemv setting, one prompt at a time (it serves one-row steps).
    ours_other: list[dict[str, Any]] = []
    if theirs and engine.runner.graph_runner is not None:
        _part(report, "other_gemv_outputs", functools.partial(
            _other_gemv_outputs, engine, prompts, n, ours_other))
    if "bench" in parts:
        # As `tokenfleet worker` does (gc_freeze): the start-up heap, HF's model included,
        # leaves the cyclic collector while the engine is timed (a full pass over it is a
        # stall of every step); back before the engine is dropped, so that it can be freed.
        gc.collect()
        gc.freeze()
        try:
            _part(report, "engine_bench",
                  functools.partial(gpu_bench.bench_engine, engine, plan))
        finally:
            gc.unfreeze()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if theirs is not None and ours is not None:
        hf32 = hf.float()
        _part(report, "parity", lambda: _judge(hf32, prompts, ours, theirs, plan))
        if ours_other:
            _part(report, "parity_other_gemv",
                  lambda: _judge(hf32, prompts, ours_other, theirs, plan))


def _other_gemv_outputs(engine: Any, prompts: list[list[int]], n: int,
                        into: list[dict[str, Any]]) -> str:
    """Parity outputs with the other `fused_decode_gemv` setting, each prompt alone."""
    on = not engine.config.fused_decode_gemv
    with gpu_bench.fused_gemv_graphs(engine, on):
        into.extend(gpu_parity.engine_outputs(engine, [p], n, gpu_bench.generate,
                                              f"other{i}-")[0] for i, p in enumerate(prompts))
    return f"fused_decode_gemv={on}, batch 1, {len(into)} prompts"


def _judge(hf32: Any, prompts: list[list[int]], ours: list[dict[str, Any]],
           theirs: list[dict[str, Any]], plan: dict[str, Any]) -> list[dict[str, Any]]:
    rows = gpu_parity.judge(hf32, prompts, ours, theirs, plan["device"], plan["tie_nats"])
    if not all(r["ok"] for r in rows):
        raise AssertionError("engine errors exceed transformers-bf16's own vs the fp32 truth")
    return rows


def _build_random_llama(plan: dict[str, Any], model_dir: Path) -> Any:
    """A random-weight Llama in `model_dir` (safetensors + a word-level tokenizer)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, plan["dtype"])
    config = LlamaConfig(**plan["model"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the target dtype: no fp32 copy
    try:
        with torch.device(plan["device"]):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    started = time.perf_counter()
    model.save_pretrained(model_dir, max_shard_size="5GB")
    vocab = {f"t{i}": i for i in range(plan["model"]["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "t1", "eos_token": "t2", "tokenizer_class": "PreTrainedTokenizerFast"}))
    print(f"random model saved to {model_dir} in {time.perf_counter() - started:.1f} s")
    return model


def _load_engine(plan: dict[str, Any], model_dir: Path) -> Any:
    from tokenfleet.engine import LLMEngine

    started = time.perf_counter()
    engine = LLMEngine.from_model(str(model_dir), dtype=plan["dtype"], device=plan["device"],
                                  attention_backend="triton", **plan["engine_args"])
    print(f"engine loaded in {time.perf_counter() - started:.1f} s")
    return engine


def _print_table(report: dict[str, Any]) -> None:
    ours, hf = report.get("engine_bench") or {}, report.get("hf_bench") or {}
    weight_gb = report.get("weight_bytes", 0) / 1e9
    floor_ms = weight_gb / COPY_TB_S
    print(f"\nweights {weight_gb:.2f} GB; bandwidth floor {floor_ms:.2f} ms/step at "
          f"{COPY_TB_S} TB/s; device {report['versions'].get('device')}")
    print("| batch | ours tok/s | ours decode ms/step | ours decode tok/s | ours GB/s | HF tok/s "
          "| HF ms/step | ours/HF | floor/ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    replay = ours.get("replay")
    if replay:
        print(f"graph replay alone (GPU ms): {replay}")
    ours = {k: v for k, v in ours.items() if k != "replay"}
    for batch in sorted(set(ours) | set(hf), key=lambda b: (int(b.split()[0]), b)):
        o, h = ours.get(batch, {}), hf.get(batch.split()[0], {})
        ms = o.get("ms_step", float("nan"))
        print(f"| {batch} | {o.get('tok_s', float('nan')):.1f} | {ms:.2f} "
              f"| {o.get('decode_tok_s', float('nan')):.1f} "
              f"| {weight_gb / ms * 1e3:.0f} | {h.get('tok_s', float('nan')):.1f} "
              f"| {h.get('ms_step', float('nan')):.2f} "
              f"| {o.get('tok_s', float('nan')) / h.get('tok_s', float('nan')):.2f} "
              f"| {floor_ms / ms:.2f} |")
    for row in report.get("attention_bench") or []:
        if "baseline_us" in row:
            print(f"{row['case']} per layer (32 in one graph): baseline (cuBLAS) "
                  f"{row['baseline_us']:.2f} us, fused {row.get('fused_us', float('nan')):.2f}"
                  f" us at {row.get('best_config')} ({row.get('fused_GB_s', 0):.0f} GB/s; "
                  f"ratio {row.get('baseline_over_fused', float('nan')):.2f}); wrong configs: "
                  f"{row.get('wrong_configs', [])}")
            continue
        if "torch_us" in row:
            print(f"{row['case']}: torch ops {row['torch_us']:.1f} us, ours "
                  f"{row['ours_us']:.1f} us (ratio {row['torch_over_ours']:.2f})")
            continue
        if "fused_us" in row:
            print(f"{row['case']} per layer (32 in one graph): two kernels "
                  f"{row['two_kernels_us']:.2f} us, fused {row['fused_us']:.2f} us "
                  f"(ratio {row['two_over_fused']:.2f})")
            continue
        print(f"attention {row['case']}: ours {row['ours_ms']:.3f} ms "
              f"({row['ours_GB_s']:.0f} GB/s KV, {row['ours_TFLOP_s']:.1f} TFLOP/s), no-split "
              f"{row['ours_no_split_ms']:.3f} ms, SDPA {row['sdpa_ms']:.3f} ms "
              f"(SDPA/ours {row['sdpa_over_ours']:.2f})"
              + (f"; tiles (block_m, block_n) ms: {row['tiles_ms']}" if "tiles_ms" in row else "")
              + (f"; by split count (graph) ms: {row['splits_ms']}" if "splits_ms" in row
                 else ""))


if __name__ == "__main__":
    sys.exit(main())
