"""Engine throughput vs HF transformers `generate`, same process, same weights, same dtype.

    python benchmarks/bench_engine.py [--model smollm2] [--dtype bfloat16]
        [--prompt-len 128] [--new-tokens 128] [--hf-batches 1,8,32] [--batches 1,8,32,64]
        [--quantize int8|int4]

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


def bench_hf(model_dir: str, dtype: torch.dtype, batch: int, prompt_len: int, new_tokens: int
             ) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.tensor(_prompts(batch, prompt_len, model.config.vocab_size, 1))
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
    prompts = _prompts(batch, prompt_len, llm.engine.model_config.vocab_size, 1)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return {"tok_s": batch * new_tokens / elapsed, "elapsed_s": elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--hf-batches", default="1,8,32")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None,
                    help="weight-only quantization of our engine (HF stays in --dtype)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=64, quantize=args.quantize)
    model_dir = str(llm.engine.config.model_dir)
    hf = {b: bench_hf(model_dir, dtype, b, args.prompt_len, args.new_tokens)
          for b in map(int, filter(None, args.hf_batches.split(",")))}
    ours = {b: bench_engine(llm, b, args.prompt_len, args.new_tokens)["tok_s"]
            for b in map(int, args.batches.split(","))}
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype}, quantize={args.quantize}, "
          f"{args.prompt_len} prompt / {args.new_tokens} new tokens")
    print(f"{'batch':>6} {'HF tok/s':>10} {'ours tok/s':>11} {'ratio':>7}")
    for b in sorted(set(hf) | set(ours)):
        h, o = hf.get(b), ours.get(b)
        ratio = f"{o / h:.2f}x" if h and o else "-"
        print(f"{b:>6} {h or 0:>10.1f} {o or 0:>11.1f} {ratio:>7}")
    result: dict[str, Any] = {"hf": hf, "engine": ours, "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
