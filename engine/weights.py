"""Reading HF checkpoints: config.json and safetensors weights (never pickle).

`iter_safetensors` memory-maps each file with `safetensors.safe_open` and yields tensors one
at a time, so the loader can copy each straight into its parameter (or shard it) without ever
holding a second full copy of the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from tokenfleet.engine.errors import ModelLoadError

__all__ = ["iter_safetensors", "load_hf_config", "safetensors_files"]

_INDEX_NAME = "model.safetensors.index.json"
_SINGLE_NAME = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_hf_config(model_dir: Path) -> dict[str, Any]:
    """The parsed config.json of an HF model directory (ModelLoadError if absent or invalid)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelLoadError(
            f"no config.json in {model_dir}: pass a Hugging Face model directory "
            "(config.json, *.safetensors, tokenizer.json) or a .gguf file"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, not {type(config).__name__}")
    return config


def _files_from_index(model_dir: Path) -> list[Path]:
    index_path = model_dir / _INDEX_NAME
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shard_names = list(dict.fromkeys(weight_map.values()))  # first-seen order, no repeats
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{index_path} is not a valid safetensors index: {exc}") from exc
    shards = [model_dir / str(name) for name in shard_names]
    missing = [path.name for path in shards if not path.is_file()]
    if missing:
        raise ModelLoadError(
            f"{index_path} lists shards that are missing from {model_dir}: {', '.join(missing)}; "
            "the download is incomplete"
        )
    return shards


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of `model_dir`: the index's shards, model.safetensors, or *.safetensors.

    Raises ModelLoadError when there are none (pickle checkpoints are refused, not loaded).
    """
    model_dir = Path(model_dir)
    if (model_dir / _INDEX_NAME).is_file():
        return _files_from_index(model_dir)
    if (model_dir / _SINGLE_NAME).is_file():
        return [model_dir / _SINGLE_NAME]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for p in model_dir.glob("*") if p.suffix in _PICKLE_SUFFIXES)
    hint = (
        f" (found {', '.join(pickles)}: tokenfleet never loads pickle checkpoints; convert them "
        "with transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, "
        "safe_serialization=True))"
        if pickles
        else ""
    )
    raise ModelLoadError(f"no *.safetensors in {model_dir}{hint}")


def _iter_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"{path} is corrupt or truncated ({exc}); re-download or re-convert the model"
        ) from exc


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every tensor of the model's safetensors file(s), mmapped.

    Tensors keep the dtype they were saved in; the caller casts and places them. Raises
    ModelLoadError for missing files, corrupt or truncated files, and duplicated names.
    """
    seen: dict[str, Path] = {}
    for path in safetensors_files(model_dir):
        for name, tensor in _iter_file(path):
            if name in seen:
                raise ModelLoadError(f"tensor {name!r} is in both {seen[name]} and {path}")
            seen[name] = path
            yield name, tensor
