"""Build the engine a `WorkerSettings` asks for. Heavy imports happen only here, lazily."""

from __future__ import annotations

from tokenfleet.worker.engine_protocol import EngineLike
from tokenfleet.worker.settings import WorkerSettings

__all__ = ["build_engine", "served_model_names"]


def build_engine(settings: WorkerSettings) -> EngineLike:
    """A SimulatedEngine (no torch) or the real LLMEngine, configured from settings."""
    if settings.engine == "simulated":
        from tokenfleet.engine.simulated_engine import SimulatedEngine

        return SimulatedEngine(
            model_name=settings.model,
            max_num_seqs=settings.max_num_seqs,
            step_time_s=settings.sim_step_ms / 1000,
            vocab_size=settings.sim_vocab_size,
            max_model_len=settings.sim_max_model_len,
            num_kv_blocks=settings.num_kv_blocks or 4096,
            block_size=settings.block_size,
        )
    from tokenfleet.engine.llm_engine import LLMEngine

    device = _resolve_device(settings.device)
    engine: EngineLike = LLMEngine.from_model(
        settings.model,
        cache_dir=settings.resolved_cache_dir,
        dtype=settings.dtype,
        device=device,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        num_kv_blocks=settings.num_kv_blocks,
        kv_cache_bytes=settings.kv_cache_bytes,
        block_size=settings.block_size,
        num_threads=settings.num_threads,
        quantize=None if settings.quantize == "none" else settings.quantize,
        attention_backend=settings.attention_backend,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        cuda_graph_max_batch=settings.cuda_graph_max_batch,
        async_decode=settings.async_decode,
        speculate=settings.speculate,
        tensor_parallel_size=settings.tensor_parallel_size,
        cpu_compile=settings.cpu_compile and device == "cpu",
        cpu_attention_kernel=settings.cpu_attention_kernel,
        cpu_sampler_kernel=settings.cpu_sampler_kernel,
        cpu_gemm_kernel=settings.cpu_gemm_kernel,
    )
    return engine


def served_model_names(settings: WorkerSettings, engine: EngineLike) -> frozenset[str]:
    """Names a job's `model` may use to reach this worker ("" = any)."""
    names = {"", settings.model}
    name = getattr(engine.config, "model_name", None)
    if name:
        names.add(str(name))
    return frozenset(names)


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
