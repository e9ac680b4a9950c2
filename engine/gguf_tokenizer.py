"""Build an HF `tokenizers` tokenizer (tokenizer.json) from GGUF `tokenizer.ggml.*` metadata.

GGUF stores the vocabulary, the BPE merges, the token types and a pre-tokenizer *name*
(`tokenizer.ggml.pre`); the pre-tokenizer itself lives in llama.cpp's C++ code. We rebuild the
original HF pre-tokenizer for the names we know, so that our tokenizer splits text exactly like
the model's original `tokenizer.json` (and like llama.cpp), and refuse names we do not know
rather than silently tokenizing differently.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`: SmolLM, Llama 3, GPT-2 style)
are supported; SentencePiece ("llama") and others raise `UnsupportedModelError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from tokenfleet.engine.errors import ModelLoadError, UnsupportedModelError

__all__ = ["GGUFTokenizer", "build_gguf_tokenizer"]

# llama.cpp token types (gguf.TokenType): 3 = CONTROL (special), 4 = USER_DEFINED (added text).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# The Llama 3 / tiktoken cl100k split, as in Meta's original tokenizer.json.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class GGUFTokenizer:
    """A tokenizer rebuilt from GGUF metadata, ready to be written as HF files."""

    tokenizer: Tokenizer  # what goes into tokenizer.json
    tokenizer_config: dict[str, Any]  # what goes into tokenizer_config.json
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None


def _byte_level_pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """The HF pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre` name, and ignore_merges."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("default", "gpt-2", "gpt2"):
        return byte_level, False
    if pre == "smollm":
        # llama.cpp isolates every \p{N} code point before the GPT-2 regex; SmolLM's own
        # tokenizer.json does the same with Digits(individual_digits=True).
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, byte_level]), False
    if pre in ("llama-bpe", "llama3"):
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False)
        no_regex = pre_tokenizers.ByteLevel(
            add_prefix_space=False, trim_offsets=True, use_regex=False
        )
        return pre_tokenizers.Sequence([split, no_regex]), True
    raise UnsupportedModelError(
        f"GGUF tokenizer pre-tokenizer {pre!r} is not supported (supported: default, gpt-2, "
        "smollm, llama-bpe); convert the original Hugging Face model directory instead"
    )


def _token_id(metadata: Mapping[str, Any], key: str, num_tokens: int) -> int | None:
    value = metadata.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    token_id = int(value)
    if not 0 <= token_id < num_tokens:
        raise ModelLoadError(f"GGUF tokenizer.ggml.{key}={token_id} is outside the vocabulary")
    return token_id


def _post_processor(
    tokens: list[str], bos_id: int | None, eos_id: int | None, add_bos: bool, add_eos: bool
) -> processors.PostProcessor:
    """BOS/EOS insertion lives in tokenizer.json so that every HF loader agrees with us."""
    bos = [(tokens[bos_id], bos_id)] if add_bos and bos_id is not None else []
    eos = [(tokens[eos_id], eos_id)] if add_eos and eos_id is not None else []
    if not bos and not eos:
        return processors.ByteLevel(trim_offsets=False)
    first = [f"{t}:0" for t, _ in bos] + ["$A:0"] + [f"{t}:0" for t, _ in eos]
    second = [f"{t}:1" for t, _ in bos] + ["$B:1"] + [f"{t}:1" for t, _ in eos]
    return processors.TemplateProcessing(
        single=first, pair=first + second, special_tokens=bos + eos
    )


def _added_tokens(tokens: list[str], token_types: list[int]) -> list[tuple[int, AddedToken]]:
    added = []
    for token_id, token_type in enumerate(token_types):
        if token_type in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED):
            special = token_type == _TOKEN_TYPE_CONTROL
            added.append(
                (token_id, AddedToken(tokens[token_id], special=special, normalized=False))
            )
    return added


def _build_bpe(metadata: Mapping[str, Any], tokens: list[str]) -> Tokenizer:
    merges_raw = metadata.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise ModelLoadError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    merges: list[tuple[str, str]] = []
    for merge in merges_raw:
        left, sep, right = str(merge).partition(" ")
        if not sep:
            raise ModelLoadError(f"GGUF merge {merge!r} is not of the form 'left right'")
        merges.append((left, right))
    pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(
        str(metadata.get("tokenizer.ggml.pre", "default"))
    )
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    tokenizer = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _tokenizer_config(
    tokens: list[str],
    added: list[tuple[int, AddedToken]],
    ids: Mapping[str, int | None],
    flags: Mapping[str, bool],
    chat_template: str | None,
    model_max_length: int | None,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "add_bos_token": flags["add_bos"],
        "add_eos_token": flags["add_eos"],
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {
                "content": token.content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": token.special,
            }
            for token_id, token in added
        },
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    for name in ("bos", "eos", "unk", "pad"):
        token_id = ids[name]
        if token_id is not None:
            config[f"{name}_token"] = tokens[token_id]
    if chat_template:
        config["chat_template"] = chat_template
    if model_max_length:
        config["model_max_length"] = model_max_length
    return config


def build_gguf_tokenizer(
    metadata: Mapping[str, Any], model_max_length: int | None = None
) -> GGUFTokenizer:
    """Rebuild the HF tokenizer described by a GGUF file's `tokenizer.*` metadata.

    `metadata` maps GGUF keys to their decoded values (`ReaderField.contents()`).
    Raises UnsupportedModelError for tokenizer kinds we cannot reproduce exactly.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
            "convert the original Hugging Face model directory instead"
        )
    tokens = [str(token) for token in metadata.get("tokenizer.ggml.tokens") or []]
    if not tokens:
        raise ModelLoadError("GGUF file has no tokenizer.ggml.tokens")
    token_types = [int(t) for t in metadata.get("tokenizer.ggml.token_type") or []]
    tokenizer = _build_bpe(metadata, tokens)
    added = _added_tokens(tokens, token_types)
    tokenizer.add_special_tokens([token for _, token in added if token.special])
    tokenizer.add_tokens([token for _, token in added if not token.special])
    ids = {
        "bos": _token_id(metadata, "bos_token_id", len(tokens)),
        "eos": _token_id(metadata, "eos_token_id", len(tokens)),
        "unk": _token_id(metadata, "unknown_token_id", len(tokens)),
        "pad": _token_id(metadata, "padding_token_id", len(tokens)),
    }
    flags = {
        "add_bos": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    }
    tokenizer.post_processor = _post_processor(
        tokens, ids["bos"], ids["eos"], flags["add_bos"], flags["add_eos"]
    )
    chat_template = metadata.get("tokenizer.chat_template")
    config = _tokenizer_config(
        tokens, added, ids, flags, str(chat_template) if chat_template else None, model_max_length
    )
    return GGUFTokenizer(tokenizer, config, ids["bos"], ids["eos"], ids["pad"])
