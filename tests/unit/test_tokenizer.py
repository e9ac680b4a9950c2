"""Tokenizer: encode/decode/chat template agree with transformers' AutoTokenizer on the same dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tokenfleet.engine.errors import ModelLoadError, ValidationError
from tokenfleet.engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TRICKY = [
    "Hello world",
    " leading space",
    "  two  spaces  ",
    "trailing newline\n",
    "tabs\tand\nnewlines\n\n\r\n",
    "12345 + 678 = 9999",
    "x1y22z333 3.14159 1,000,000",
    "³²¹ ½ ٣ 四",  # non-ASCII numbers (SmolLM splits every \p{N} code point)
    "héllo wörld ñ Ελληνικά русский 中文 日本語",
    "emoji 😀👍🏽 👨‍👩‍👧 家族",
    "don't I'll we've THEY'RE",
    "<|im_start|>user\nhi<|im_end|>\n",
    "text with <|endoftext|> inside",
    "<|im_end|>",
    "",
    " ",
    "\n",
    "def f(x):\n    return x ** 2  # comment\n",
    "a" * 300,
]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def ours(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def ref(smollm2_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(ours: Tokenizer, ref: Any, add_special_tokens: bool) -> None:
    for text in [*TRICKY, ref.apply_chat_template(FRANCE, tokenize=False)]:
        got = ours.encode(text, add_special_tokens=add_special_tokens)
        assert got == ref.encode(text, add_special_tokens=add_special_tokens), repr(text)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(ours: Tokenizer, ref: Any, skip_special_tokens: bool) -> None:
    for text in TRICKY:
        ids = ours.encode(text)
        got = ours.decode(ids, skip_special_tokens=skip_special_tokens)
        assert got == ref.decode(ids, skip_special_tokens=skip_special_tokens), repr(text)
        if not skip_special_tokens:
            assert got == text, "decode(encode(text)) must round-trip"


def test_decode_drops_special_tokens(ours: Tokenizer) -> None:
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert ours.decode(ids) == "user\nhi"


def test_non_ascii_digits_are_split_one_by_one(ours: Tokenizer) -> None:
    # SmolLM's tokenizer (and llama.cpp's "smollm" pre-tokenizer) isolate every number code
    # point; transformers' GGUF converter ignores that and would merge " ½" into one piece.
    tokens = ours.convert_ids_to_tokens(ours.encode("³²¹ ½ ٣"))
    assert [ours.decode(ours.encode(t)) for t in ("³", "²", "¹")] == ["³", "²", "¹"]
    assert "Ġ" in tokens  # the space before ½ is its own piece, not glued to the digit


def test_chat_template_matches_transformers(ours: Tokenizer, ref: Any) -> None:
    conversations = [
        FRANCE,
        [{"role": "system", "content": "Be brief."}, *FRANCE],
        [*FRANCE, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Ok"}],
    ]
    for messages in conversations:
        for add_prompt in (True, False):
            expected = ref.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_prompt
            )
            assert ours.apply_chat_template(messages, add_generation_prompt=add_prompt) == expected
    assert ours.apply_chat_template(FRANCE) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": ["a", "b"]}],
        [{"role": 3, "content": "x"}],
        ["user: hi"],
        {"role": "user", "content": "hi"},
    ],
)
def test_bad_messages_are_validation_errors(ours: Tokenizer, messages: Any) -> None:
    with pytest.raises(ValidationError):
        ours.apply_chat_template(messages)


def test_special_token_properties(ours: Tokenizer, ref: Any) -> None:
    assert ours.vocab_size == len(ref) == 49152
    assert ours.bos_token_id == ref.bos_token_id == 1
    assert ours.eos_token_ids == frozenset({ref.eos_token_id}) == frozenset({2})
    assert set(ref.all_special_ids) <= ours.all_special_ids
    assert ours.add_bos is False  # SmolLM2 does not prepend BOS
    assert ours.is_special(2) and not ours.is_special(ours.encode("Hello")[0])
    ids = ours.encode("Hello world <|im_end|>")
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert isinstance(ours.hf_tokenizer, type(ref.backend_tokenizer))


def _copy_tokenizer(src: Path, dst: Path, **config_changes: Any) -> Path:
    dst.mkdir()
    shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.update(config_changes)
    config = {k: v for k, v in config.items() if v is not None}
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def test_llama_class_adds_bos_like_transformers(smollm2_dir: Path, tmp_path: Path) -> None:
    # LlamaTokenizerFast rebuilds the post-processor from add_bos_token at load time.
    # (add_prefix_space would make transformers convert from the slow sentencepiece model.)
    model_dir = _copy_tokenizer(
        smollm2_dir,
        tmp_path / "llama",
        tokenizer_class="LlamaTokenizer",
        add_bos_token=True,
        add_eos_token=True,
        add_prefix_space=None,
    )
    ours = Tokenizer.from_dir(model_dir)
    ref = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert ours.add_bos
    for text in ("Hello world", "", "<|im_start|>x"):
        assert ours.encode(text) == ref.encode(text), repr(text)
        assert ours.encode(text, add_special_tokens=False) == ref.encode(
            text, add_special_tokens=False
        )


def test_eos_ids_merge_generation_config(smollm2_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy_tokenizer(smollm2_dir, tmp_path / "eos")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (model_dir / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert Tokenizer.from_dir(model_dir).eos_token_ids == frozenset({0, 2, 5})


def test_clean_up_tokenization_spaces_like_transformers(smollm2_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy_tokenizer(smollm2_dir, tmp_path / "clean", clean_up_tokenization_spaces=True)
    ours, ref = Tokenizer.from_dir(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = ours.encode("Hello , world . Isn 't it ?")
    assert ours.decode(ids) == ref.decode(ids) == "Hello, world. Isn 't it?"


def test_no_chat_template(smollm2_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy_tokenizer(smollm2_dir, tmp_path / "plain", chat_template=None)
    with pytest.raises(ValidationError, match="no chat template"):
        Tokenizer.from_dir(model_dir).apply_chat_template(FRANCE)


def test_template_exceptions_are_validation_errors(smollm2_dir: Path, tmp_path: Path) -> None:
    template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('need system') }}{% endif %}"
    )
    model_dir = _copy_tokenizer(smollm2_dir, tmp_path / "strict", chat_template=template)
    with pytest.raises(ValidationError, match="need system"):
        Tokenizer.from_dir(model_dir).apply_chat_template(FRANCE)


def test_template_sandbox_blocks_python_internals(smollm2_dir: Path, tmp_path: Path) -> None:
    template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    model_dir = _copy_tokenizer(smollm2_dir, tmp_path / "evil", chat_template=template)
    with pytest.raises(ValidationError):
        Tokenizer.from_dir(model_dir).apply_chat_template(FRANCE)


def test_load_errors(smollm2_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    bad = _copy_tokenizer(smollm2_dir, tmp_path / "bad")
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(bad)
    broken_template = _copy_tokenizer(smollm2_dir, tmp_path / "tpl", chat_template="{% for %}")
    with pytest.raises(ModelLoadError, match="chat template"):
        Tokenizer.from_dir(broken_template)
