"""Triton kernels of tokenfleet, with launchers that check their arguments.

Modules (import them directly; importing this package loads no Triton code):
- `paged_attention`: mixed prefill/decode paged attention with GQA grouping, sliding window
  and flash-decoding splits; `kv_store`: write new K/V into the paged cache;
  `rms_norm`: RMSNorm fused with the residual add; `rotary`: in-place rotary embedding.
- `reference`: slow torch versions of each (test oracles, CPU fallbacks); `rope_cache`: the
  cos/sin table the rotary kernel reads.
- `selfcheck`, `paged_batch`, `attention_bench`, `sm90_compile`: correctness checks, random
  paged batches, timing and an sm_90 compile report, used by tests and benchmarks/gpu_check.py.

On a machine without a GPU the kernels run in Triton's interpreter (`TRITON_INTERPRET=1`, set
before these modules are imported).
"""
