"""The model's tokenizer: HF `tokenizers` + tokenizer_config.json, behaving like transformers.

`Tokenizer.from_dir` reads tokenizer.json, tokenizer_config.json, special_tokens_map.json,
generation_config.json and config.json from an HF model directory. Encoding and decoding
match transformers' `AutoTokenizer(...).encode` / `.decode` for the same directory, including
the quirk that Llama/Gemma-class tokenizers rebuild their BOS/EOS post-processor from
tokenizer_config.json at load time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as HFTokenizer

from tokenfleet.engine.chat_template import ChatTemplate, load_chat_template_source
from tokenfleet.engine.errors import ModelLoadError, ValidationError

__all__ = ["Tokenizer"]

# transformers' tokenizer classes that rebuild the post-processor from add_bos/add_eos_token
# (update_post_processor); add_bos_token defaults to True for them.
_TEMPLATE_CLASSES = frozenset(
    {"LlamaTokenizer", "CodeLlamaTokenizer", "GemmaTokenizer", "CohereTokenizer"}
)
# AutoTokenizer's choice when tokenizer_config.json names no class (by config.json model_type).
_CLASS_BY_MODEL_TYPE = {
    "llama": "LlamaTokenizer",
    "mistral": "LlamaTokenizer",
    "mixtral": "LlamaTokenizer",
    "gemma": "GemmaTokenizer",
    "gemma2": "GemmaTokenizer",
}
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """Special tokens are stored as strings or as AddedToken dicts {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, int) and not isinstance(item, bool)]
    return []


def _load_backend(model_dir: Path) -> HFTokenizer:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(
            f"no tokenizer.json in {model_dir}; tokenfleet needs a fast tokenizer: create it "
            "with transformers' AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
        )
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise ModelLoadError(f"{path} is not a valid tokenizers file: {exc}") from exc
    # transformers disables tokenizer.json's truncation/padding unless a call asks for them.
    backend.no_truncation()
    backend.no_padding()
    return backend


def _add_missing_added_tokens(backend: HFTokenizer, tokenizer_config: Mapping[str, Any]) -> None:
    """Tokens listed only in tokenizer_config's added_tokens_decoder (transformers adds them)."""
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    for token_id, spec in sorted(decoder.items(), key=lambda item: int(item[0])):
        if backend.id_to_token(int(token_id)) is not None or not isinstance(spec, Mapping):
            continue
        token = AddedToken(
            spec["content"],
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", not spec.get("special", False)),
            special=spec.get("special", False),
        )
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])


def _apply_bos_eos_template(
    backend: HFTokenizer, tokenizer_config: Mapping[str, Any], model_type: str | None
) -> None:
    """Mirror transformers' LlamaTokenizerFast.update_post_processor() for those classes."""
    name = tokenizer_config.get("tokenizer_class") or _CLASS_BY_MODEL_TYPE.get(model_type or "")
    if not name or str(name).removesuffix("Fast") not in _TEMPLATE_CLASSES:
        return
    bos = _token_text(tokenizer_config.get("bos_token"))
    eos = _token_text(tokenizer_config.get("eos_token"))
    add_bos = bool(tokenizer_config.get("add_bos_token", True))
    add_eos = bool(tokenizer_config.get("add_eos_token", False))
    specials: list[tuple[str, int]] = []
    single, pair = ["$A:0"], ["$B:1"]
    for add, text, position in ((add_bos, bos, 0), (add_eos, eos, None)):
        if not add:
            continue
        token_id = backend.token_to_id(text) if text is not None else None
        if text is None or token_id is None:
            raise ModelLoadError(
                f"tokenizer_config.json adds BOS/EOS token {text!r}, which is not in the vocabulary"
            )
        specials.append((text, token_id))
        if position == 0:
            single.insert(0, f"{text}:0")
            pair.insert(0, f"{text}:1")
        else:
            single.append(f"{text}:0")
            pair.append(f"{text}:1")
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=single + pair, special_tokens=specials
    )


class Tokenizer:
    """Encode/decode text and render chat templates for one model (immutable, thread-safe)."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        special_tokens: Mapping[str, str],
        eos_token_ids: Iterable[int],
        bos_token_id: int | None = None,
        chat_template: ChatTemplate | None = None,
        clean_up_tokenization_spaces: bool = False,
        extra_special_ids: Iterable[int] = (),
    ) -> None:
        self._backend = backend
        self.special_tokens = dict(special_tokens)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = bos_token_id
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.chat_template = chat_template
        self._clean_up = clean_up_tokenization_spaces
        named_ids = (backend.token_to_id(text) for text in self.special_tokens.values())
        flagged = (i for i, token in backend.get_added_tokens_decoder().items() if token.special)
        self.all_special_ids: frozenset[int] = frozenset(
            i
            for i in (*named_ids, *flagged, *self.eos_token_ids, *extra_special_ids)
            if i is not None
        )
        with_specials = backend.encode("", add_special_tokens=True).ids
        self.add_bos: bool = bool(with_specials) and with_specials[0] == bos_token_id

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        """Load the tokenizer of the HF model directory `model_dir`."""
        model_dir = Path(model_dir)
        tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
        tokenizer_config.update(
            (key, value)
            for key, value in _read_json(model_dir / "special_tokens_map.json").items()
            if key in _SPECIAL_NAMES
        )
        model_config = _read_json(model_dir / "config.json")
        generation_config = _read_json(model_dir / "generation_config.json")
        backend = _load_backend(model_dir)
        _add_missing_added_tokens(backend, tokenizer_config)
        _apply_bos_eos_template(backend, tokenizer_config, model_config.get("model_type"))
        special_tokens = {
            name: text
            for name in _SPECIAL_NAMES
            if (text := _token_text(tokenizer_config.get(name))) is not None
        }
        bos_text = special_tokens.get("bos_token")
        bos_id = backend.token_to_id(bos_text) if bos_text is not None else None
        if bos_id is None:
            bos_id = next(iter(_as_ids(model_config.get("bos_token_id"))), None)
        eos_text = special_tokens.get("eos_token")
        eos_ids = {
            *_as_ids(backend.token_to_id(eos_text) if eos_text is not None else None),
            *_as_ids(generation_config.get("eos_token_id")),
            *_as_ids(model_config.get("eos_token_id")),
        }
        extra = [
            i
            for text in tokenizer_config.get("additional_special_tokens") or []
            if (t := _token_text(text)) is not None and (i := backend.token_to_id(t)) is not None
        ]
        source = load_chat_template_source(model_dir, tokenizer_config)
        return cls(
            backend,
            special_tokens=special_tokens,
            eos_token_ids=eos_ids,
            bos_token_id=bos_id,
            chat_template=ChatTemplate(source, special_tokens) if source else None,
            clean_up_tokenization_spaces=bool(
                tokenizer_config.get("clean_up_tokenization_spaces", False)
            ),
            extra_special_ids=extra,
        )

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (for fast incremental decoding helpers)."""
        return self._backend

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what the grammar compiler reads)."""
        return self._backend.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS/EOS as the model wants them."""
        if not isinstance(text, str):
            raise ValidationError(f"text to encode must be a string, not {type(text).__name__}")
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, exactly as transformers' decode() returns it."""
        text: str = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary strings of `ids` ("" for ids outside the vocabulary)."""
        return [self._backend.id_to_token(int(i)) or "" for i in ids]

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string, or None."""
        return self._backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special token (BOS, EOS, control tokens, ...)."""
        return token_id in self.all_special_ids

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render chat `messages` as the prompt text (ValidationError on bad messages)."""
        if self.chat_template is None:
            raise ValidationError("this model has no chat template; send `inputs` text instead")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (only used when tokenizer_config asks for it)."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text
