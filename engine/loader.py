"""Builds a model from an HF directory: config -> empty model -> weights copied in place.

Each parameter carries its own `weight_loader` (packed q/k/v and gate/up slices), so loading
needs no per-model code. Only safetensors are read (never pickle).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tokenfleet.engine.config import EngineConfig, ModelConfig
from tokenfleet.engine.errors import ModelLoadError
from tokenfleet.engine.layers.cpu_prepack import pack_cpu_linears
from tokenfleet.engine.models.registry import CausalLM, model_class
from tokenfleet.engine.quant.int4_weight_only import quantize_int4_weight_only
from tokenfleet.engine.quant.int8_weight_only import quantize_int8_weight_only
from tokenfleet.engine.tensor_parallel import (
    plan_tensor_parallel,
    shard_vocab,
    wrap_row_parallel,
)
from tokenfleet.engine.weights import iter_safetensors, load_hf_config
from tokenfleet.kernels import cpu_qgemm

__all__ = ["load_engine_model", "load_model", "load_model_config"]


def load_model_config(model_dir: Path) -> ModelConfig:
    return ModelConfig.from_hf(load_hf_config(model_dir))


def load_model(model_dir: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
               max_positions: int, tp_rank: int = 0, tp_size: int = 1) -> CausalLM:
    """The model with its weights. Under tensor parallelism `cfg` is the rank's config
    (`shard_model_config`) and each split linear loads its rank's slice."""
    cls = model_class(cfg.architecture)
    with torch.device(device):
        model = cls(cfg, max_positions)
    plan_tensor_parallel(model, tp_rank, tp_size)
    model.to(dtype=dtype)
    # RoPE tables stay float32: positions index them, precision matters more than bytes.
    for name, buf in model.named_buffers():
        if name.endswith("cos_sin"):
            buf.data = buf.data.float()
    _load_weights(model, model_dir, cfg)
    if tp_size > 1:
        wrap_row_parallel(model)
        shard_vocab(model, cfg.vocab_size, tp_rank, tp_size)
    return model.eval()


def load_engine_model(config: EngineConfig, cfg: ModelConfig, device: torch.device,
                      tp_rank: int = 0, tp_size: int = 1) -> CausalLM:
    """The model as the engine runs it: loaded (this rank's slice), then quantized or, on
    CPU, with prepacked weights, as `config` asks."""
    assert config.model_dir is not None and config.max_model_len is not None
    model = load_model(config.model_dir, cfg, config.torch_dtype, device, config.max_model_len,
                       tp_rank, tp_size)
    if config.quantize is not None:
        qgemm = cpu_qgemm.load(config.kernel_dir) \
            if config.cpu_gemm_kernel and device.type == "cpu" else None
        quantize = {"int8": quantize_int8_weight_only, "int4": quantize_int4_weight_only}
        quantize[config.quantize](model, device, config.torch_dtype, qgemm)
    elif config.cpu_prepack:
        pack_cpu_linears(model, config)
    return model


def _load_weights(model: nn.Module, model_dir: Path, cfg: ModelConfig) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    packed: dict[str, tuple[str, str | int]] = getattr(model, "packed_modules", {})
    expected = _expected_checkpoint_names(params, packed, cfg)
    seen: set[str] = set()
    for name, tensor in iter_safetensors(model_dir):
        if "rotary_emb.inv_freq" in name:
            continue  # a buffer some old checkpoints carry; we compute it
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue  # tied to embed_tokens
        target, shard = _map_name(name, packed)
        param = params.get(target)
        if param is None:
            raise ModelLoadError(f"checkpoint tensor {name!r} has no place in the model "
                                 f"({cfg.architecture}); is config.json right for these weights?")
        loader = getattr(param, "weight_loader", None)
        if loader is not None:
            loader(tensor, shard)
        elif tuple(param.shape) != tuple(tensor.shape):
            raise ModelLoadError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                                 f"model {tuple(param.shape)}")
        else:
            with torch.no_grad():
                param.copy_(tensor)
        seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        raise ModelLoadError(f"checkpoint in {model_dir} lacks {len(missing)} tensor(s), "
                             f"e.g. {missing[:3]}")


def _map_name(name: str, packed: dict[str, tuple[str, str | int]]) -> tuple[str, str | int | None]:
    for ckpt_part, (ours, shard) in packed.items():
        if f".{ckpt_part}." in name:
            return name.replace(f".{ckpt_part}.", f".{ours}."), shard
    return name, None


def _expected_checkpoint_names(params: dict[str, nn.Parameter],
                               packed: dict[str, tuple[str, str | int]],
                               cfg: ModelConfig) -> set[str]:
    reverse: dict[str, list[str]] = {}
    for ckpt_part, (ours, _) in packed.items():
        reverse.setdefault(ours, []).append(ckpt_part)
    names: set[str] = set()
    for pname in params:
        if cfg.tie_word_embeddings and pname == "lm_head.weight":
            continue
        parts = pname.split(".")
        owner = parts[-2] if len(parts) >= 2 else ""
        if owner in reverse:
            names.update(pname.replace(f".{owner}.", f".{c}.") for c in reverse[owner])
        else:
            names.add(pname)
    return names
