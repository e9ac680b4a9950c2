"""Convert a llama.cpp GGUF file into a Hugging Face model directory.

The output is what every other part of tokenfleet (and transformers) reads: config.json
(LlamaForCausalLM), model.safetensors, tokenizer.json, tokenizer_config.json (with the chat
template) and generation_config.json. Quantised tensors are dequantised with the `gguf`
package; the row permutation that llama.cpp's converter applies to the Q and K projections
(to turn HF's rotate-half RoPE into GGML's interleaved pairs) is undone, otherwise attention
would silently rotate the wrong dimensions.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file

from tokenfleet.engine.errors import ModelLoadError, ModelNotFoundError, UnsupportedModelError
from tokenfleet.engine.gguf_tokenizer import GGUFTokenizer, build_gguf_tokenizer

__all__ = ["ProgressFn", "convert_gguf_to_hf", "gguf_to_hf_name"]

ProgressFn = Callable[[int, int, str], None]
"""Called as `progress(num_done, num_total, tensor_name)` after each converted tensor."""

_SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")


@dataclass(frozen=True)
class _LlamaHParams:
    """The hyper-parameters of a GGUF "llama" model, read from `llama.*` metadata."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    context_length: int
    rope_scaling: dict[str, Any] | None


def gguf_to_hf_name(name: str) -> str:
    """Map a GGUF tensor name (`blk.3.attn_q.weight`) to its HF Llama name.

    Raises UnsupportedModelError for tensors a plain Llama does not have (MoE experts,
    rope_freqs, ...), so that a model is never loaded with a part silently dropped.
    """
    if match := _BLOCK_RE.match(name):
        layer, part, kind = match.groups()
        if part in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    elif (match := _GLOBAL_RE.match(name)) and match.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[match.group(1)]}.{match.group(2)}"
    raise UnsupportedModelError(f"GGUF tensor {name!r} has no Llama equivalent (not supported)")


def _as_float(value: Any) -> float:
    # GGUF stores float32: 1e-5 comes back as 9.999999747378752e-06; keep the short decimal.
    return float(str(np.float32(value)))


def _int_field(metadata: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = metadata.get(key, default)
    if value is None:
        raise ModelLoadError(f"GGUF file lacks required metadata {key!r}")
    if not isinstance(value, int):
        raise UnsupportedModelError(f"GGUF metadata {key}={value!r} is not a single integer")
    return value


def _rope_scaling(metadata: Mapping[str, Any], arch: str) -> dict[str, Any] | None:
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = _as_float(metadata.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    raise UnsupportedModelError(f"GGUF rope scaling type {kind!r} is not supported (only linear)")


def _read_hparams(metadata: Mapping[str, Any], arch: str) -> _LlamaHParams:
    hidden_size = _int_field(metadata, f"{arch}.embedding_length")
    num_heads = _int_field(metadata, f"{arch}.attention.head_count")
    head_dim = _int_field(metadata, f"{arch}.attention.key_length", hidden_size // num_heads)
    rope_dim = _int_field(metadata, f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise UnsupportedModelError(f"partial rotary embedding ({rope_dim} of {head_dim} dims)")
    if metadata.get(f"{arch}.expert_count", 0):
        raise UnsupportedModelError("GGUF mixture-of-experts models are not supported")
    return _LlamaHParams(
        num_layers=_int_field(metadata, f"{arch}.block_count"),
        hidden_size=hidden_size,
        intermediate_size=_int_field(metadata, f"{arch}.feed_forward_length"),
        num_heads=num_heads,
        num_kv_heads=_int_field(metadata, f"{arch}.attention.head_count_kv", num_heads),
        head_dim=head_dim,
        rms_norm_eps=_as_float(metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_as_float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        context_length=_int_field(metadata, f"{arch}.context_length", 2048),
        rope_scaling=_rope_scaling(metadata, arch),
    )


def _reverse_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation: per head, interleaved (x0,y0,x1,y1..) -> halves."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    # [rows, *rest] -> [num_heads, half, 2, *rest] -> swap (half, 2) -> [rows, *rest]
    permuted = weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2)
    return permuted.reshape(weight.shape)


def _dequantize(reader_tensor: Any) -> np.ndarray:
    name, qtype = reader_tensor.name, reader_tensor.tensor_type
    try:
        values = dequantize(reader_tensor.data, qtype)
    except NotImplementedError as exc:
        raise UnsupportedModelError(
            f"GGUF tensor {name!r} uses quantisation {qtype.name}, which the gguf package "
            "cannot dequantise; use a Q4_0/Q4_1/Q5_*/Q8_0/K-quant/F16/BF16/F32 file"
        ) from exc
    shape = [int(dim) for dim in reversed(reader_tensor.shape)]  # GGUF lists ne0 first
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    # F32 tensors come back as views of the read-only memory map; torch wants its own copy.
    return values if values.flags.writeable else values.copy()


def _convert_tensors(
    reader: GGUFReader, hparams: _LlamaHParams, dtype: torch.dtype, progress: ProgressFn | None
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    num_total = len(reader.tensors)
    for num_done, reader_tensor in enumerate(reader.tensors, start=1):
        hf_name = gguf_to_hf_name(reader_tensor.name)
        tensor = torch.from_numpy(_dequantize(reader_tensor))
        if ".attn_q." in reader_tensor.name:
            tensor = _reverse_permute(tensor, hparams.num_heads)
        elif ".attn_k." in reader_tensor.name:
            tensor = _reverse_permute(tensor, hparams.num_kv_heads)
        tensors[hf_name] = tensor.to(dtype).contiguous()
        if progress is not None:
            progress(num_done, num_total, hf_name)
    return tensors


def _check_shapes(tensors: Mapping[str, torch.Tensor], hparams: _LlamaHParams) -> None:
    expected = {
        "model.layers.0.self_attn.q_proj.weight": (
            hparams.num_heads * hparams.head_dim,
            hparams.hidden_size,
        ),
        "model.layers.0.self_attn.k_proj.weight": (
            hparams.num_kv_heads * hparams.head_dim,
            hparams.hidden_size,
        ),
        "model.layers.0.mlp.up_proj.weight": (hparams.intermediate_size, hparams.hidden_size),
    }
    for name, shape in expected.items():
        if name not in tensors:
            raise ModelLoadError(f"GGUF file lacks tensor for {name}")
        if tuple(tensors[name].shape) != shape:
            raise ModelLoadError(f"{name} has shape {tuple(tensors[name].shape)}, want {shape}")
    if "model.embed_tokens.weight" not in tensors:
        raise ModelLoadError("GGUF file lacks token_embd.weight")


def _hf_config(
    hparams: _LlamaHParams,
    tensors: Mapping[str, torch.Tensor],
    tokenizer: GGUFTokenizer,
    dtype: torch.dtype,
) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hparams.hidden_size,
        "intermediate_size": hparams.intermediate_size,
        "num_hidden_layers": hparams.num_layers,
        "num_attention_heads": hparams.num_heads,
        "num_key_value_heads": hparams.num_kv_heads,
        "head_dim": hparams.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": hparams.rms_norm_eps,
        "rope_theta": hparams.rope_theta,
        "rope_scaling": hparams.rope_scaling,
        "max_position_embeddings": hparams.context_length,
        "vocab_size": int(tensors["model.embed_tokens.weight"].shape[0]),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in tensors,
        "mlp_bias": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def _open_gguf(gguf_path: Path) -> tuple[GGUFReader, dict[str, Any]]:
    if not gguf_path.is_file():
        raise ModelNotFoundError(f"GGUF file {gguf_path} does not exist")
    try:
        reader = GGUFReader(gguf_path)
        metadata = {key: field.contents() for key, field in reader.fields.items()}
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ModelLoadError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc
    return reader, metadata


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf_to_hf(
    gguf_path: Path,
    out_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    progress: ProgressFn | None = None,
) -> Path:
    """Convert a GGUF "llama" model into an HF directory at `out_dir`; returns `out_dir`.

    Writes config.json, model.safetensors (in `dtype`), tokenizer.json,
    tokenizer_config.json and generation_config.json. The caller makes it atomic (write to
    a temp dir, rename). Raises ModelNotFoundError, ModelLoadError or UnsupportedModelError.
    """
    gguf_path = Path(gguf_path)
    reader, metadata = _open_gguf(gguf_path)
    arch = metadata.get("general.architecture")
    if arch not in _SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gguf_path.name}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(_SUPPORTED_ARCHITECTURES)})"
        )
    hparams = _read_hparams(metadata, arch)
    tokenizer = build_gguf_tokenizer(metadata, model_max_length=hparams.context_length)
    tensors = _convert_tensors(reader, hparams, dtype, progress)
    _check_shapes(tensors, hparams)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.tokenizer.save(str(out_dir / "tokenizer.json"))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    # save_file creates the file 0600; give it the same permissions as the other files.
    shutil.copymode(out_dir / "tokenizer.json", out_dir / "model.safetensors")
    _write_json(out_dir / "tokenizer_config.json", tokenizer.tokenizer_config)
    _write_json(out_dir / "config.json", _hf_config(hparams, tensors, tokenizer, dtype))
    generation = {
        key: value
        for key, value in (
            ("bos_token_id", tokenizer.bos_token_id),
            ("eos_token_id", tokenizer.eos_token_id),
            ("pad_token_id", tokenizer.pad_token_id),
        )
        if value is not None
    }
    _write_json(out_dir / "generation_config.json", generation)
    return out_dir
