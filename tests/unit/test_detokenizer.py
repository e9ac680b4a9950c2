"""IncrementalDetokenizer on real BPE tokenizers (byte-level and SentencePiece-style)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenfleet.engine.detokenizer import IncrementalDetokenizer

SMOLLM2_TOKENIZER = Path(__file__).resolve().parents[2] / (
    ".cache/tokenfleet-test/models/smollm2/tokenizer.json"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "café naïve résumé façade über straße Ångström jalapeño crème brûlée",
    "你好世界，今天天气很好。日本語のテキストです。한국어 문장입니다.",
    "emoji time 😀😀 👍🏽 🇫🇷 🎉 ❤️ and more 😀 text",
    "def f(x):\n    return x * 2  # numbers 0123456789 {}[]()<>",
] * 20


class HFTokenizer:
    """The slice of `tokenfleet.engine.tokenizer.Tokenizer` the detokenizer uses."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, tok in added.items() if tok.special)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids


def _byte_level_bpe() -> HFTokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return HFTokenizer(tok)


def _metaspace_bpe() -> HFTokenizer:
    """SentencePiece-style: '▁' marks spaces and the decoder drops the leading one."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", *SPECIALS])
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return HFTokenizer(tok)


BYTE_LEVEL = _byte_level_bpe()
METASPACE = _metaspace_bpe()


@functools.cache
def _smollm2() -> HFTokenizer | None:
    if not SMOLLM2_TOKENIZER.exists():
        return None
    return HFTokenizer(Tokenizer.from_file(str(SMOLLM2_TOKENIZER)))


def _tokenizers() -> list[HFTokenizer]:
    """Our trained byte-level BPE, plus SmolLM2's when another test has pulled it."""
    smollm2 = _smollm2()
    return [BYTE_LEVEL] if smollm2 is None else [BYTE_LEVEL, smollm2]


def _stream(tok: HFTokenizer, prompt_ids: list[int], ids: list[int], skip: bool = True
            ) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    pieces = [detok.add(i) for i in ids]
    rest = detok.flush()
    assert detok.text == "".join(pieces) + rest
    return pieces, rest


TEXT = st.text(
    alphabet=st.one_of(
        st.characters(exclude_categories=["Cs"]),  # any character but lone surrogates
        # Multi-byte favourites: a skin-tone modifier and a combining accent on their own too.
        st.sampled_from([*"aé你😀👍🏽🇫 \n", "\U0001f3fd", "\u0301"]),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT, prompt=st.sampled_from(["", "Hello", "你好 😀", "résumé:\n"]))
def test_streamed_text_equals_full_decode_byte_level(text: str, prompt: str) -> None:
    # Our trained BPE has all 256 bytes, so it round-trips every string. SmolLM2's vocab lacks
    # a few bytes that valid UTF-8 of assigned characters never uses (e.g. 0xF1, planes 4-7),
    # so there the reference is decode(ids), not the text.
    assert BYTE_LEVEL.decode(BYTE_LEVEL.encode(text)) == text
    for tok in _tokenizers():
        prompt_ids, ids = tok.encode(prompt), tok.encode(text)
        full = tok.decode(ids)
        pieces, rest = _stream(tok, prompt_ids, ids)
        assert "".join(pieces) + rest == full
        if full == text:
            assert rest == ""  # valid text leaves nothing held back at the end
        if "\ufffd" not in full:
            assert all("\ufffd" not in piece for piece in pieces)


@settings(max_examples=100, deadline=None)
@given(words=st.lists(st.sampled_from(["the", "quick", "fox", "hello", "world", "café",
                                       "x", "(x):", "2", "\n"]), max_size=12),
       lead=st.sampled_from(["", " "]))
def test_leading_spaces_survive_with_sentencepiece_style_decoder(words: list[str],
                                                                  lead: str) -> None:
    text = lead + " ".join(words)
    ids = METASPACE.encode(text)
    for prompt in ["", "Hello world"]:
        prompt_ids = METASPACE.encode(prompt)
        pieces, rest = _stream(METASPACE, prompt_ids, ids)
        full = METASPACE.decode(prompt_ids + ids)
        assert METASPACE.decode(prompt_ids) + "".join(pieces) + rest == full


def test_multibyte_characters_come_out_whole() -> None:
    text = "👍🏽 ok 🇫🇷"  # not merged by the small vocab: several byte tokens per character
    ids = BYTE_LEVEL.encode(text)
    assert len(ids) > len(text)
    pieces, _ = _stream(BYTE_LEVEL, [], ids)
    assert "".join(pieces) == text
    assert pieces.count("") >= 3  # bytes of unfinished characters were held back
    for piece in pieces:
        piece.encode("utf-8")  # a str of whole characters
        assert "\ufffd" not in piece


def test_flush_releases_an_unfinished_character_as_replacement() -> None:
    ids = BYTE_LEVEL.encode("a😀")
    detok = IncrementalDetokenizer(BYTE_LEVEL, [])
    pieces = [detok.add(i) for i in ids[:-1]]  # the emoji's last byte never arrives
    assert "".join(pieces) == "a"
    assert detok.flush() == BYTE_LEVEL.decode(ids[:-1])[1:]
    assert detok.flush() == ""
    assert detok.text == BYTE_LEVEL.decode(ids[:-1])


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(skip: bool) -> None:
    im_end = BYTE_LEVEL.tokenizer.token_to_id("<|im_end|>")
    assert BYTE_LEVEL.is_special(im_end)
    prompt = [BYTE_LEVEL.tokenizer.token_to_id("<|im_start|>"), *BYTE_LEVEL.encode("user\nhi")]
    ids = [*BYTE_LEVEL.encode(" café"), im_end, *BYTE_LEVEL.encode(" 😀 done")]
    pieces, _ = _stream(BYTE_LEVEL, prompt, ids, skip=skip)
    assert pieces[len(BYTE_LEVEL.encode(" café"))] == ("" if skip else "<|im_end|>")
    expected = " café 😀 done" if skip else " café<|im_end|> 😀 done"
    assert "".join(pieces) == expected


def test_resume_by_replaying_generated_ids() -> None:
    """A restart mid-character continues exactly where the earlier detokenizer stopped."""
    prompt_ids = BYTE_LEVEL.encode("Q: ")
    ids = BYTE_LEVEL.encode("bonjour 👍🏽 à tous")
    whole, _ = _stream(BYTE_LEVEL, prompt_ids, ids)
    for cut in range(len(ids) + 1):
        detok = IncrementalDetokenizer(BYTE_LEVEL, prompt_ids)
        for token_id in ids[:cut]:
            detok.add(token_id)
        assert detok.text == "".join(whole[:cut])
        assert [detok.add(i) for i in ids[cut:]] == whole[cut:]


def test_smollm2_chat_reply_streams_like_full_decode(smollm2_dir: Path) -> None:
    """With the engine's own Tokenizer over the pulled SmolLM2 directory."""
    from tokenfleet.engine.tokenizer import Tokenizer as EngineTokenizer

    tok = EngineTokenizer.from_dir(smollm2_dir)
    prompt = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]))
    reply_text = "The capital of France is Paris. Voilà — très bien! 🇫🇷 巴黎"
    reply = tok.encode(reply_text, add_special_tokens=False)
    eos = min(tok.eos_token_ids)
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(i) for i in [*reply, eos]]
    assert pieces[-1] == ""  # EOS is special: no text
    assert "".join(pieces) == reply_text
    assert detok.flush() == ""
