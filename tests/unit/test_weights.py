"""weights.py: safetensors (single and sharded) read back exactly; every broken case is named."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tokenfleet.engine.errors import ModelLoadError
from tokenfleet.engine.weights import iter_safetensors, load_hf_config, safetensors_files

transformers = pytest.importorskip("transformers")


def _tiny_model(**overrides: object) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **overrides,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    return dict(iter_safetensors(model_dir))


def test_single_file_matches_transformers(tmp_path: Path) -> None:
    model = _tiny_model()
    model.save_pretrained(tmp_path, safe_serialization=True)
    state = _state(tmp_path)
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    assert safetensors_files(tmp_path) == [tmp_path / "model.safetensors"]
    assert load_hf_config(tmp_path)["num_key_value_heads"] == 2


def test_sharded_index_reads_every_shard(tmp_path: Path) -> None:
    model = _tiny_model()
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    shards = safetensors_files(tmp_path)
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    state = _state(tmp_path)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_index_with_missing_shard(tmp_path: Path) -> None:
    _tiny_model().save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    victim = safetensors_files(tmp_path)[1]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=victim.name):
        _state(tmp_path)


def test_unindexed_safetensors_files_are_used(tmp_path: Path) -> None:
    save_file({"b": torch.ones(3)}, str(tmp_path / "part-2.safetensors"))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "part-1.safetensors"))
    assert list(_state(tmp_path)) == ["a", "b"]


def test_duplicate_tensor_names_across_files(tmp_path: Path) -> None:
    save_file({"a": torch.ones(3)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.zeros(3)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ModelLoadError, match="'a' is in both"):
        _state(tmp_path)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: data[: len(data) // 2],  # truncated download
        lambda data: data[:5],  # not even a header
        lambda data: b"\x00" * len(data),  # zeroed
        lambda data: b"<html>404 Not Found</html>" * 10,  # an error page saved as the file
    ],
)
def test_corrupt_file_is_named(tmp_path: Path, corrupt: Callable[[bytes], bytes]) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is corrupt or truncated"):
        _state(tmp_path)


def test_no_weights_and_pickle_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors in"):
        _state(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle bytes")
    with pytest.raises(ModelLoadError, match="never loads pickle") as info:
        _state(tmp_path)
    assert "pytorch_model.bin" in str(info.value)


def test_bad_index(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ModelLoadError, match="not a valid safetensors index"):
        _state(tmp_path)


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ModelLoadError, match="JSON object"):
        load_hf_config(tmp_path)


def test_tensors_stream_one_file_at_a_time(tmp_path: Path) -> None:
    # The loader copies one tensor at a time: nothing is read ahead, and an error in a later
    # file names that file.
    save_file({"a": torch.ones(4)}, str(tmp_path / "part-1.safetensors"))
    (tmp_path / "part-2.safetensors").write_bytes(b"garbage" * 10)
    iterator = iter_safetensors(tmp_path)
    name, tensor = next(iterator)
    assert name == "a" and torch.equal(tensor, torch.ones(4))
    with pytest.raises(ModelLoadError, match=r"part-2\.safetensors"):
        next(iterator)


def test_an_mlp_activation_we_do_not_compute_is_refused() -> None:
    from tokenfleet.engine.config import ModelConfig
    from tokenfleet.engine.errors import UnsupportedModelError

    hf = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "hidden_size": 64,
          "vocab_size": 100, "intermediate_size": 128, "num_hidden_layers": 1}
    assert ModelConfig.from_hf({**hf, "hidden_act": "silu"}).hidden_size == 64
    with pytest.raises(UnsupportedModelError, match="hidden_act 'gelu'"):
        ModelConfig.from_hf({**hf, "hidden_act": "gelu"})
