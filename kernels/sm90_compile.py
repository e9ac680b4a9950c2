"""Compile every kernel for Hopper (sm_90) without a GPU, and report what the compiler made.

    python -m tokenfleet.kernels.sm90_compile      (with TRITON_INTERPRET unset)

Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) runs on the CPU, so a
variant that does not compile for the H100 fails here instead of on a short GPU lease. For
each launch variant the launchers pick at Llama-3-8B shapes it prints shared memory, registers
and spill stack (cuobjdump) and the instructions that matter: tensor-core ops (wgmma vs
mma.sync) and 16-byte / async global loads. Pointers and strides are compiled as multiples of
16, as Triton specialises them at run time for our contiguous caches. Exit status 1 when a
variant fails to compile or spills registers.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Variant", "compile_variant", "main", "variants"]

_INSTRUCTIONS = re.compile(
    r"(wgmma\.mma_async\.[a-z0-9.]*?\.f32|mma\.sync\.[a-z0-9.]*?\.f32|"
    r"ld\.global(?:\.L1::evict_first\.L2::cache_hint)?\.v4|"
    r"cp\.async\.cg\.shared\.global|cp\.async\.bulk)"
)


@dataclass(frozen=True)
class Variant:
    name: str
    kernel: Any  # a triton JITFunction
    types: dict[str, str]  # non-constexpr args; others default to i32
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 3


def variants() -> list[Variant]:
    """The launch variants used at Llama-3-8B shapes (bf16), plus fp32 and SmolLM2 heads."""
    from tokenfleet.kernels.kv_store import _store_kv_kernel
    from tokenfleet.kernels.norm_gemv import _norm_gemv_kernel, _sum_parts_kernel
    from tokenfleet.kernels.paged_attention import choose_tiles
    from tokenfleet.kernels.paged_attention_kernels import (
        paged_attention_kernel,
        reduce_splits_kernel,
    )
    from tokenfleet.kernels.rms_norm import _rms_norm_kernel
    from tokenfleet.kernels.rotary import _rotary_kernel
    from tokenfleet.kernels.rotary_store_kv import _rotary_store_kv_kernel
    from tokenfleet.kernels.row_stats import _BLOCK, _CHUNK, _row_chunk_kernel, _row_merge_kernel

    def attention(name: str, dtype: str, group: int, head_dim: int, max_query_len: int,
                  splits: int, window: bool) -> Variant:
        t = choose_tiles(group, head_dim, max_query_len)
        ptr = f"*{dtype}"
        types = {"out_ptr": ptr, "q_ptr": ptr, "k_cache_ptr": ptr, "v_cache_ptr": ptr,
                 "part_out_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
                 "block_tables_ptr": "*i32", "query_start_loc_ptr": "*i32",
                 "seq_lens_ptr": "*i32", "scale_log2": "fp32"}
        consts = dict(NUM_QUERIES_PER_KV=group, GROUP_PADDED=t.group_padded, HEAD_DIM=head_dim,
                      HEAD_DIM_PADDED=head_dim, PAGE_SIZE=16, BLOCK_Q=t.block_q,
                      BLOCK_M=t.block_m, BLOCK_N=t.block_n, NUM_SPLITS=splits,
                      USE_WINDOW=window, UPCAST=False,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
        return Variant(name, paged_attention_kernel, types, consts, t.num_warps, t.num_stages)

    def rotary_store_kv(name: str, rotary_dim: int) -> Variant:
        types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "positions_ptr": "*i64",
                 "cos_sin_ptr": "*fp32", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
                 "slot_mapping_ptr": "*i64"}
        consts = dict(NUM_HEADS=32, HEADS_PADDED=32, NUM_KV_HEADS=8, KV_HEADS_PADDED=8,
                      HEAD_DIM=128, HEAD_DIM_PADDED=128, HALF=rotary_dim // 2,
                      HALF_PADDED=rotary_dim // 2, TAIL_PADDED=max(128 - rotary_dim, 1),
                      PAGE_SIZE=16)
        return Variant(name, _rotary_store_kv_kernel, types, consts, num_warps=4)

    def norm_gemv(name: str, block_n: int, block_k: int, num_warps: int,
                  norm: bool = True, silu_mul: bool = False, split_k: int = 1) -> Variant:
        types = {"out_ptr": "*bf16", "new_residual_ptr": "*bf16", "x_ptr": "*bf16",
                 "residual_ptr": "*bf16", "norm_weight_ptr": "*bf16", "weight_ptr": "*bf16",
                 "bias_ptr": "*bf16", "eps": "fp32"}
        consts = dict(K=4096 if norm else 14336, BLOCK_N=block_n, BLOCK_K=block_k,
                      SPLIT_K=split_k, APPLY_NORM=norm, HAS_RESIDUAL=norm, HAS_BIAS=False,
                      SILU_MUL=silu_mul)
        return Variant(name, _norm_gemv_kernel, types, consts, num_warps=num_warps)

    return [
        attention("attention decode", "bf16", 4, 128, 1, 1, False),
        attention("attention decode split8", "bf16", 4, 128, 1, 8, False),
        attention("attention prefill", "bf16", 4, 128, 512, 1, False),
        attention("attention mixed window", "bf16", 4, 128, 16, 1, True),
        attention("attention decode fp32", "fp32", 4, 128, 1, 1, False),
        attention("attention prefill smollm2", "bf16", 3, 64, 512, 1, False),
        Variant("reduce splits", reduce_splits_kernel,
                {"out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_max_ptr": "*fp32",
                 "part_sum_ptr": "*fp32"},
                dict(NUM_HEADS=32, HEAD_DIM=128, HEAD_DIM_PADDED=128, NUM_SPLITS=8,
                     SPLITS_PADDED=8), num_warps=4),
        Variant("store_kv", _store_kv_kernel,
                {"k_ptr": "*bf16", "v_ptr": "*bf16", "k_cache_ptr": "*bf16",
                 "v_cache_ptr": "*bf16", "slot_mapping_ptr": "*i64"},
                dict(NUM_KV_HEADS=8, HEADS_PADDED=8, HEAD_DIM=128, HEAD_DIM_PADDED=128,
                     PAGE_SIZE=16), num_warps=4),
        Variant("rms_norm + residual", _rms_norm_kernel,
                {"out_ptr": "*bf16", "new_residual_ptr": "*bf16", "x_ptr": "*bf16",
                 "residual_ptr": "*bf16", "weight_ptr": "*bf16", "eps": "fp32"},
                dict(HIDDEN=4096, BLOCK=4096, HAS_RESIDUAL=True), num_warps=8),
        Variant("rotary", _rotary_kernel,
                {"q_ptr": "*bf16", "k_ptr": "*bf16", "positions_ptr": "*i64",
                 "cos_sin_ptr": "*fp32"},
                dict(NUM_HEADS=32, HEADS_PADDED=32, NUM_KV_HEADS=8, KV_HEADS_PADDED=8,
                     HALF=64, HALF_PADDED=64), num_warps=4),
        rotary_store_kv("rotary + store_kv", 128),
        rotary_store_kv("rotary + store_kv partial", 64),
        norm_gemv("norm + gemv 32x256", 32, 256, 4),
        norm_gemv("norm + gemv 64x512", 64, 512, 8),
        norm_gemv("gemv 32x512 (down)", 32, 512, 4, norm=False),
        norm_gemv("silu_mul + gemv 32x512 (down)", 32, 512, 4, norm=False, silu_mul=True),
        norm_gemv("norm + gemv 16x512 split4", 16, 512, 4, split_k=4),
        norm_gemv("silu_mul + gemv 8x512 split4", 8, 512, 4, norm=False, silu_mul=True,
                  split_k=4),
        Variant("gemv split-K sum", _sum_parts_kernel,
                {"out_ptr": "*bf16", "parts_ptr": "*fp32", "bias_ptr": "*bf16"},
                dict(SPLIT_K=4, BLOCK=1024, HAS_BIAS=False), num_warps=4),
        Variant("row stats chunks (Llama 3 vocab, bf16)", _row_chunk_kernel,
                {"scores_ptr": "*bf16", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
                 "part_arg_ptr": "*i32", "part_nan_ptr": "*i32"},
                dict(NUM_CHUNKS=32, CHUNK=_CHUNK, BLOCK=_BLOCK), num_warps=4),
        Variant("row stats merge", _row_merge_kernel,
                {"argmax_ptr": "*i64", "lse_ptr": "*fp32", "part_max_ptr": "*fp32",
                 "part_sum_ptr": "*fp32", "part_arg_ptr": "*i32", "part_nan_ptr": "*i32"},
                dict(NUM_CHUNKS=32, CHUNKS_PADDED=32), num_warps=1),
    ]


def compile_variant(v: Variant, work_dir: Path) -> dict[str, Any]:
    """Compile one variant for sm_90; returns shared bytes, registers, stack, instructions."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = v.kernel.arg_names
    # A constexpr left out would be compiled as a runtime i32 argument, silently.
    missing = [p.name for p in v.kernel.params if p.is_constexpr and p.name not in v.constexprs]
    if missing:
        raise ValueError(f"{v.name}: no value for the constexpr parameters {missing}")
    signature = {n: "constexpr" if n in v.constexprs else v.types.get(n, "i32") for n in names}
    aligned = [n for n in names if n.endswith("_ptr") or n.startswith("stride")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned if n != "stride_bt_seq"}
    src = ASTSource(fn=v.kernel, signature=signature, constexprs=v.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    cubin = work_dir / f"{re.sub(r'[^a-z0-9]+', '_', v.name)}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = _resource_usage(cubin)
    found = Counter(_INSTRUCTIONS.findall(compiled.asm["ptx"]))
    return {"shared": compiled.metadata.shared, **usage, "instructions": dict(found)}


def _resource_usage(cubin: Path) -> dict[str, int | None]:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {"registers": None, "stack": None}
    text = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True,
                          text=True, check=False).stdout
    match = re.search(r"REG:(\d+)\s+STACK:(\d+)", text)
    if match is None:
        return {"registers": None, "stack": None}
    return {"registers": int(match.group(1)), "stack": int(match.group(2))}


def main() -> int:
    from tokenfleet.kernels.launch_checks import is_interpreted

    if is_interpreted():
        print("unset TRITON_INTERPRET: the interpreter cannot compile", file=sys.stderr)
        return 2
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants():
            try:
                r = compile_variant(v, Path(tmp))
            except Exception as exc:  # report every variant, then fail
                failures += 1
                print(f"FAIL {v.name}: {exc!r}")
                continue
            spills = bool(r["stack"])
            failures += spills
            print(f"{'FAIL' if spills else 'ok  '} {v.name:28s} warps={v.num_warps} "
                  f"stages={v.num_stages} shared={r['shared']:6d} regs={r['registers']} "
                  f"stack={r['stack']} {r['instructions']}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
