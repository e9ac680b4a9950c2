"""Engine throughput vs HF transformers `generate`, same process, same weights, same dtype.

    python benchmarks/bench_engine.py [--model smollm2] [--dtype bfloat16]
        [--prompt-len 128] [--new-tokens 128] [--hf-batches 1,8,32] [--batches 1,8,32,64]
        [--engines bf16,bf16+compile,int4+compile,int4+compile+stock]

Prints output tokens/s for each batch size and the ratios engine/HF. Prompts are random
token ids (no EOS stops: both sides generate exactly --new-tokens tokens per request).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch

from tokenfleet.engine import LLM, SamplingParams


def _prompts(n: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (prompt_len,), generator=g).tolist() for _ in range(n)]


def _seed(batch: int) -> int:
    """Prompts differ between batch sizes: with one seed for all, the first prompts of the
    batch-32 run were those of the batch-8 run, and our prefix cache skipped their prefill
    (runs before 2026-11-27 had that bias at batch 8 and 32 when run after smaller batches)."""
    return 1000 + batch


def bench_hf(model_dir: str, dtype: torch.dtype, batch: int, prompt_len: int, new_tokens: int
             ) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.tensor(_prompts(batch, prompt_len, model.config.vocab_size, _seed(batch)))
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
        elapsed = time.perf_counter() - t0
    assert out.shape[1] == prompt_len + new_tokens
    return batch * new_tokens / elapsed


def bench_engine(llm: LLM, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    llm.generate(_prompts(2, 16, llm.engine.model_config.vocab_size, 2),
                 SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
    prompts = _prompts(batch, prompt_len, llm.engine.model_config.vocab_size, _seed(batch))
    hits = llm.engine.block_manager.num_prefix_hits
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    assert all(len(o.token_ids) == new_tokens for o in outs)
    # HF recomputes every prompt: so must we, or the ratio flatters us.
    assert llm.engine.block_manager.num_prefix_hits == hits, "prefix-cache hits in a timed run"
    return {"tok_s": batch * new_tokens / elapsed, "elapsed_s": elapsed}


def engine_args(spec: str) -> dict[str, Any]:
    """"bf16", "int4", "int8", each optionally "+compile" and/or "+stock" (linears on the stock
    kernels instead of our C GEMM kernels: bf16 on oneDNN, int4/int8 on torch's; "+onednn" is
    the older name, in earlier RESULTS.md commands): our engine's configurations."""
    quant, *extras = spec.split("+")
    if quant not in ("bf16", "int8", "int4") or not set(extras) <= {"compile", "stock", "onednn"}:
        raise SystemExit(f"bad engine spec {spec!r}: use bf16|int8|int4, optionally +compile "
                         "and/or +stock")
    return {"quantize": None if quant == "bf16" else quant, "cpu_compile": "compile" in extras,
            "cpu_gemm_kernel": not {"stock", "onednn"} & set(extras)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--hf-batches", default="1,8,32")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--engines", default="bf16",
                    help="our configurations, comma-separated: bf16|int8|int4, each optionally "
                         "+compile and/or +stock (linears on oneDNN / torch's int4 and int8 "
                         "kernels, not ours; e.g. bf16,bf16+compile,int4+compile); HF stays in "
                         "--dtype")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    specs = args.engines.split(",")
    llms = {spec: LLM(args.model, dtype=args.dtype, max_num_seqs=64, **engine_args(spec))
            for spec in specs}  # compiles (if asked) before anything is timed
    model_dir = str(next(iter(llms.values())).engine.config.model_dir)
    hf_batches = [int(b) for b in args.hf_batches.split(",") if b]
    batches = sorted(set(hf_batches) | {int(b) for b in args.batches.split(",") if b})
    hf: dict[int, float] = {}
    ours: dict[str, dict[int, float]] = {spec: {} for spec in specs}
    for b in batches:  # each batch size: HF, then ours, back to back (this VM drifts)
        if b in hf_batches:
            hf[b] = bench_hf(model_dir, dtype, b, args.prompt_len, args.new_tokens)
        for spec, llm in llms.items():
            ours[spec][b] = bench_engine(llm, b, args.prompt_len, args.new_tokens)["tok_s"]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype}, "
          f"{args.prompt_len} prompt / {args.new_tokens} new tokens; tok/s (ratio to HF)")
    print(f"{'batch':>6} {'HF':>8} " + " ".join(f"{spec:>20}" for spec in specs))
    for b in batches:
        h = hf.get(b)
        cells = [f"{ours[spec][b]:8.1f} ({ours[spec][b] / h:.2f}x)" if h else
                 f"{ours[spec][b]:8.1f}" for spec in specs]
        print(f"{b:>6} {h or 0:>8.1f} " + " ".join(f"{c:>20}" for c in cells))
    result: dict[str, Any] = {"hf": hf, "engines": ours, "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
