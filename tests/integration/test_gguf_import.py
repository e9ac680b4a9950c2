"""GGUF → HF conversion checked against the original model and against transformers' GGUF loader.

Tiny GGUF files are written here the way llama.cpp's convert_hf_to_gguf.py writes them (Q/K rows
permuted, names renamed, optional quantisation), from a random HF Llama with grouped-query
attention: converting back must give the original tensors bit for bit (F32), so a missing or
wrong un-permutation fails. The real SmolLM2 Q4_1 file is compared with transformers' own GGUF
dequantisation (slow).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from tokenfleet.engine.errors import ModelLoadError, ModelNotFoundError, UnsupportedModelError
from tokenfleet.engine.gguf_import import convert_gguf_to_hf
from tokenfleet.engine.hub import resolve_model, source_gguf
from tokenfleet.engine.tokenizer import Tokenizer
from tokenfleet.engine.weights import iter_safetensors

transformers = pytest.importorskip("transformers")

# HF name suffix -> GGUF name (written independently of the code under test).
_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "1 2"]
_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def _byte_symbols() -> list[str]:
    """GPT-2's byte → printable-unicode table."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    symbols = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


TOKENS = _SPECIALS + _byte_symbols() + [m.replace(" ", "") for m in _MERGES]


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (rotate-half rows -> interleaved pairs)."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, layer, rest = hf_name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{layer}.{_TO_GGUF[module]}.{kind}"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[hf_name]


def _tiny_hf_model(tie: bool) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=len(TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: K must be un-permuted with the KV head count
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _write_metadata(writer: Any, config: Any, meta: dict[str, Any]) -> None:
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_tokenizer_model(meta.get("tokenizer_model", "gpt2"))
    writer.add_tokenizer_pre(meta.get("pre", "smollm"))
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(_SPECIALS) + [1] * (len(TOKENS) - len(_SPECIALS)))
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(meta.get("add_bos", False))
    writer.add_chat_template(_TEMPLATE)
    if meta.get("expert_count"):
        writer.add_expert_count(meta["expert_count"])


def write_tiny_gguf(
    path: Path, model: Any, qtypes: dict[str, QType] | None = None, **meta: Any
) -> Path:
    """Write `model` as llama.cpp would; `qtypes` maps GGUF name parts to quantisations."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), meta.get("arch", "llama"))
    _write_metadata(writer, config, meta)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.detach().float().numpy()
        if ".q_proj." in hf_name:
            data = _llama_cpp_permute(data, config.num_attention_heads)
        elif ".k_proj." in hf_name:
            data = _llama_cpp_permute(data, config.num_key_value_heads)
        name = _gguf_name(hf_name)
        qtype = next((q for part, q in (qtypes or {}).items() if part in name), QType.F32)
        if qtype == QType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        elif qtype != QType.F32 and data.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@torch.inference_mode()
def _last_logits(model: Any, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("tie", [False, True])
def test_f32_round_trip_is_exact(tmp_path: Path, tie: bool) -> None:
    model = _tiny_hf_model(tie)
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", model)
    out = convert_gguf_to_hf(gguf_path, tmp_path / "hf", dtype=torch.float32)
    state = dict(iter_safetensors(out))
    expected = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), f"{name} differs (Q/K permutation?)"
    config = json.loads((out / "config.json").read_text())
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert config[key] == getattr(model.config, key), key
    assert config["tie_word_embeddings"] is tie and config["rms_norm_eps"] == 1e-5
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = [1, 5, 70, 80, 90, 100, 200, 7, 8]
    torch.testing.assert_close(
        _last_logits(converted, ids), _last_logits(model, ids), rtol=0, atol=0
    )


def _transformers_gguf_tensors(gguf_path: Path) -> dict[str, torch.Tensor]:
    """transformers' own GGUF dequantisation + un-permutation (float32), as the reference."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    skeleton = transformers.LlamaForCausalLM(config)
    loaded = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
    tensors: dict[str, torch.Tensor] = loaded["tensors"]
    return tensors


def test_quantised_tensors_match_transformers_loader(tmp_path: Path) -> None:
    model = _tiny_hf_model(tie=False)
    qtypes = {"attn_q": QType.Q8_0, "attn_k": QType.Q4_1, "attn_v": QType.Q4_0,
              "ffn": QType.Q4_1, "token_embd": QType.F16, "output.": QType.BF16}  # fmt: skip
    gguf_path = write_tiny_gguf(tmp_path / "tiny-q.gguf", model, qtypes)
    reference = _transformers_gguf_tensors(gguf_path)
    out32 = convert_gguf_to_hf(gguf_path, tmp_path / "f32", dtype=torch.float32)
    ours32 = dict(iter_safetensors(out32))
    assert ours32.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(ours32[name], tensor), name
        # and the quantised model is still close to the original (4-bit: within ~15%)
        original = model.state_dict()[name]
        assert (tensor - original).abs().max() <= 0.15 * original.abs().max() + 1e-6, name
    out16 = convert_gguf_to_hf(gguf_path, tmp_path / "bf16")  # the default dtype
    for name, tensor in iter_safetensors(out16):
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


def test_tokenizer_from_gguf(tmp_path: Path) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tok.gguf", _tiny_hf_model(tie=True))
    out = convert_gguf_to_hf(gguf_path, tmp_path / "hf", dtype=torch.float32)
    ours = Tokenizer.from_dir(out)
    ref = transformers.AutoTokenizer.from_pretrained(out)
    text = "the the in a 12 <|im_end|>"
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    # merges applied in rank order; "12" stays two tokens although "1 2" is a merge, because
    # the smollm pre-tokenizer isolates digits first
    assert ours.convert_ids_to_tokens(ids) == [
        "t", "he", "Ġthe", "Ġ", "in", "Ġa", "Ġ", "1", "2", "Ġ", "<|im_end|>"
    ]  # fmt: skip
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ids[-1] == 2 and ours.eos_token_ids == frozenset({2}) and not ours.add_bos
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == "<|im_start|>user\nhi<|im_end|>\n"
    with_bos = write_tiny_gguf(tmp_path / "bos.gguf", _tiny_hf_model(tie=True), add_bos=True)
    bos_tok = Tokenizer.from_dir(convert_gguf_to_hf(with_bos, tmp_path / "bos"))
    assert bos_tok.add_bos and bos_tok.encode("the")[0] == 1


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"arch": "mamba"}, "architecture 'mamba' is not supported"),
        ({"tokenizer_model": "llama"}, "tokenizer model 'llama' is not supported"),
        ({"pre": "qwen2"}, "pre-tokenizer 'qwen2' is not supported"),
        ({"expert_count": 4}, "mixture-of-experts"),
    ],
)
def test_unsupported_gguf(tmp_path: Path, meta: dict[str, Any], message: str) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "x.gguf", _tiny_hf_model(tie=True), **meta)
    with pytest.raises(UnsupportedModelError, match=message):
        convert_gguf_to_hf(gguf_path, tmp_path / "out")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"definitely not gguf" * 100)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        convert_gguf_to_hf(bogus, tmp_path / "out")
    with pytest.raises(ModelNotFoundError):
        convert_gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")


def test_resolve_gguf_path_converts_once(tmp_path: Path) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "m.gguf", _tiny_hf_model(tie=True))
    cache = tmp_path / "cache"
    first = resolve_model(str(gguf_path), cache_dir=cache, progress=False)
    assert first.parent == cache / "gguf" and (first / "config.json").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(gguf_path), cache_dir=cache, progress=False) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp, "converted twice"
    os.utime(gguf_path, ns=(stamp + 10**9, stamp + 10**9))  # the file changed: new entry
    assert resolve_model(str(gguf_path), cache_dir=cache, progress=False) != first


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_dir: Path) -> Path:
    cache_dir = smollm2_dir.parent.parent  # <cache>/models/smollm2
    return source_gguf("smollm2", cache_dir=cache_dir, progress=False)


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(smollm2_dir: Path, smollm2_gguf: Path) -> None:
    """Our bf16 directory == transformers' float32 GGUF weights rounded to bf16, exactly; and
    transformers on our directory computes what it computes from those weights."""
    reference = _transformers_gguf_tensors(smollm2_gguf)
    ours = dict(iter_safetensors(smollm2_dir))
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor.to(torch.bfloat16)), name
    config = transformers.AutoConfig.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name
    )
    ref_model = transformers.LlamaForCausalLM(config).eval()
    rounded = {k: v.to(torch.bfloat16).float() for k, v in reference.items()}
    ref_model.load_state_dict(rounded, strict=False)  # lm_head is tied to the embedding
    ref_model.tie_weights()
    del reference, rounded, ours
    converted = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    ids = tokenizer.encode(prompt)
    got, want = _last_logits(converted, ids), _last_logits(ref_model, ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert got.argmax() == want.argmax()


GGUF_TRICKY = [
    "Hello world",
    " leading space",
    "  two  spaces  ",
    "tabs\tand\nnewlines\n\n\r\n",
    "12345 + 678 = 9999, x1y22z333 3.14159",
    "héllo wörld ñ Ελληνικά русский 中文 日本語",
    "emoji 😀👍🏽 👨‍👩‍👧 家族",
    "don't I'll we've THEY'RE",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "def f(x):\n    return x ** 2  # comment\n",
]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(
    smollm2_dir: Path, smollm2_gguf: Path
) -> None:
    ours = Tokenizer.from_dir(smollm2_dir)
    ref = transformers.AutoTokenizer.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name
    )
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = ours.apply_chat_template(messages)
    assert chat == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # transformers' GGUF path builds a LlamaTokenizerFast, which prepends BOS although the file
    # says tokenizer.ggml.add_bos_token=false (llama.cpp and SmolLM's own tokenizer do not):
    # compare the text tokens only.
    for text in [*GGUF_TRICKY, chat]:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False), repr(text)
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), repr(text)
