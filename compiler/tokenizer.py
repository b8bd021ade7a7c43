"""Byte-level BPE tokenizer and chat template read from GGUF metadata.

The accelerator only ever sees token ids, so the host needs a tokenizer that
agrees id-for-id with the reference runtime (llama.cpp) on the same GGUF file.
This module rebuilds the GPT-2 style byte-level BPE tokenizer that llama.cpp
uses for ``tokenizer.ggml.model = gpt2`` from the GGUF key/value metadata alone
(no ``tokenizer.json``, no ``transformers``):

1. the text is first cut at special tokens (``<|im_start|>`` ...), which map
   straight to their ids;
2. the remaining pieces are pre-tokenized with the regex sequence llama.cpp
   assigns to the file's ``tokenizer.ggml.pre`` type;
3. each pre-token is mapped to the GPT-2 printable byte alphabet and merged
   by BPE rank.

Decoding is the inverse byte map; :class:`StreamDecoder` turns a stream of
generated ids into text without ever splitting a UTF-8 character.

Examples
--------
>>> tok = Tokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
>>> prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
>>> ids = tok.encode(prompt)  # doctest: +SKIP
"""

from __future__ import annotations

import codecs
import datetime
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import gguf
import regex

__all__ = ["Tokenizer", "StreamDecoder"]

# GGUF token types (gguf.TokenType); only these three matter here.
_TOKEN_UNKNOWN = 2
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# The GPT-2 pre-tokenizer regex. llama.cpp writes it without the final
# ``|\s+`` but runs it through a hand-written matcher (unicode.cpp,
# ``unicode_regex_split_custom_gpt2``) that does have that fallback, as does
# the HF ByteLevel pre-tokenizer; without it a run of whitespace followed by a
# letter (e.g. " \nb") would leave characters unmatched.
_GPT2_REGEX = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)

# ``tokenizer.ggml.pre`` -> the regexes llama.cpp applies one after the other
# (src/llama-vocab.cpp, ``llm_tokenizer_bpe`` constructor).  SmolLM shares the
# StarCoder entry: every digit is first split off on its own (``\p{N}``), then
# the GPT-2 regex runs inside each remaining piece.
_STARCODER_REGEXES = (r"\p{N}", _GPT2_REGEX)
_PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"),
        _STARCODER_REGEXES,
    ),
    **dict.fromkeys(("gpt-2", "mpt", "olmo", "jais"), (_GPT2_REGEX,)),
}

# Used when the GGUF carries no ``tokenizer.chat_template``.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Pre-tokens repeat heavily in natural text, so memoised BPE results make the
# encoder fast; the bound only keeps a long-running server from growing
# without limit.
_CACHE_LIMIT = 200_000


def _bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's reversible map from bytes to printable characters.

    BPE vocabularies store tokens as text, so every byte needs a visible,
    non-whitespace stand-in: printable Latin-1 bytes map to themselves and the
    rest are shifted to code points 256 and up (space becomes ``"Ġ"``).

    Returns
    -------
    dict[int, str]
        One character for each of the 256 byte values.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _field_value(field: gguf.ReaderField) -> Any:
    """Return the Python value of a GGUF metadata field.

    Written against ``parts``/``data`` rather than ``ReaderField.contents``
    so that it works on every ``gguf`` release the project allows.

    Parameters
    ----------
    field : gguf.ReaderField
        A field from ``GGUFReader.fields``.

    Returns
    -------
    Any
        ``str``, ``int``, ``float`` or ``bool`` for scalars; a ``list`` of
        those for arrays.
    """
    main = field.types[0]
    if main == gguf.GGUFValueType.ARRAY:
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if main == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    return field.parts[-1].tolist()[0]


class Tokenizer:
    """GPT-2 style byte-level BPE tokenizer matching llama.cpp.

    Build it with :meth:`from_gguf`; the constructor takes already-decoded
    metadata so that tests and tools can build one without a file.

    Parameters
    ----------
    tokens : Sequence[str]
        Vocabulary in id order, in GPT-2 byte-character form.
    token_types : Sequence[int]
        ``gguf.TokenType`` of each token (1 normal, 3 control, ...).
    merges : Sequence[str]
        BPE merges, ``"left right"``, highest priority first.
    pre : str
        Pre-tokenizer type (``tokenizer.ggml.pre``), e.g. ``"smollm"``.
    bos_id, eos_id : int
        Beginning- and end-of-sequence token ids.
    unk_id : int or None, optional
        Token used for bytes that have no token of their own.
    add_bos : bool, optional
        Default for :meth:`encode`'s ``add_bos``.
    chat_template : str or None, optional
        Jinja chat template; ``None`` falls back to plain ChatML.
    name : str, optional
        Where the metadata came from, for error messages.

    Raises
    ------
    ValueError
        If ``pre`` is not a supported pre-tokenizer type, a merge is
        malformed, or the token and token-type lists disagree in length.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        token_types: Sequence[int],
        merges: Sequence[str],
        *,
        pre: str,
        bos_id: int,
        eos_id: int,
        unk_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        name: str = "<tokenizer>",
    ) -> None:
        if len(tokens) != len(token_types):
            raise ValueError(
                f"{name}: tokenizer.ggml.token_type has {len(token_types)} entries "
                f"but tokenizer.ggml.tokens has {len(tokens)}"
            )
        if pre not in _PRE_TOKENIZER_REGEXES:
            raise ValueError(
                f"{name}: tokenizer.ggml.pre = {pre!r} is not supported "
                f"(supported: {', '.join(sorted(_PRE_TOKENIZER_REGEXES))})"
            )
        for key, tid in (("bos_token_id", bos_id), ("eos_token_id", eos_id), ("unknown_token_id", unk_id)):
            if tid is not None and not 0 <= tid < len(tokens):
                raise ValueError(f"{name}: tokenizer.ggml.{key} = {tid} is outside the vocabulary")

        self._name = name
        # Kept as given so that to_dict() can serialise the tokenizer.
        self._tokens = list(tokens)
        self._token_types = [int(t) for t in token_types]
        self._merges = list(merges)
        self._pre = pre
        self._bos_id = int(bos_id)
        self._eos_id = int(eos_id)
        self._unk_id = unk_id
        self._add_bos = bool(add_bos)
        self._chat_template_source = chat_template
        self._chat_template = None  # compiled lazily: jinja2 is only needed for chat

        self._token_to_id = {t: i for i, t in enumerate(tokens)}
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            # Split at the first space after position 0, as llama.cpp does, so
            # that a left part which is itself a space still parses.
            cut = merge.find(" ", 1)
            if cut < 0 or cut == len(merge) - 1:
                raise ValueError(f"{name}: tokenizer.ggml.merges[{rank}] = {merge!r} is not 'left right'")
            left, right = merge[:cut], merge[cut + 1 :]
            # Duplicated merges keep their first (highest-priority) rank.
            self._ranks.setdefault((left, right), rank)

        # Special tokens are cut out of the text before BPE, longest first,
        # exactly like llama.cpp's tokenizer_st_partition; ``_always_special``
        # are the user-defined ones, which llama.cpp (and HF "added tokens")
        # match even when the caller does not ask for special parsing.
        special_types = (_TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED)
        specials = [(t, i) for i, (t, ty) in enumerate(zip(tokens, token_types)) if ty in special_types and t]
        specials.sort(key=lambda ti: len(ti[0]), reverse=True)
        self._specials = specials
        self._always_special = [(t, i) for t, i in specials if token_types[i] == _TOKEN_USER_DEFINED]
        self._special_ids = frozenset(i for _, i in specials)

        # Decoding: normal tokens are GPT-2 byte characters; special tokens are
        # stored as literal text (llama.cpp also emits them verbatim).
        self._id_to_bytes: list[bytes] = []
        for tid, tok in enumerate(tokens):
            if tid in self._special_ids or any(c not in _CHAR_TO_BYTE for c in tok):
                self._id_to_bytes.append(tok.encode("utf-8"))
            else:
                self._id_to_bytes.append(bytes(_CHAR_TO_BYTE[c] for c in tok))

        eot = {self._eos_id}
        # llama.cpp also ends generation on these when present (its EOG set).
        for text in ("<|im_end|>", "<|endoftext|>"):
            tid = self._token_to_id.get(text)
            if tid is not None and tid in self._special_ids:
                eot.add(tid)
        self._eot_ids = frozenset(eot)

        self._pre_regexes = [
            regex.compile(f"({pattern})") for pattern in _PRE_TOKENIZER_REGEXES[pre]
        ]
        self._cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_gguf(cls, reader_or_path: gguf.GGUFReader | str | os.PathLike[str]) -> Tokenizer:
        """Build the tokenizer from a GGUF file's metadata.

        Parameters
        ----------
        reader_or_path : gguf.GGUFReader or path-like
            An open reader (reused, since opening a GGUF is slow) or a path.

        Returns
        -------
        Tokenizer

        Raises
        ------
        ValueError
            If ``tokenizer.ggml.model`` is not ``"gpt2"`` (only byte-level BPE
            is implemented), or a required ``tokenizer.ggml.*`` field is
            missing, or its values are inconsistent.
        """
        if isinstance(reader_or_path, gguf.GGUFReader):
            reader = reader_or_path
            name = str(getattr(reader.data, "filename", None) or "<GGUFReader>")
        else:
            name = os.fspath(reader_or_path)
            reader = gguf.GGUFReader(name)

        def get(key: str, default: Any = ...) -> Any:
            field = reader.fields.get(key)
            if field is None:
                if default is ...:
                    raise ValueError(f"{name}: required GGUF field {key!r} is missing")
                return default
            return _field_value(field)

        model = get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"{name}: tokenizer.ggml.model = {model!r}; only 'gpt2' "
                "(byte-level BPE) tokenizers are supported"
            )
        unk_id = get("tokenizer.ggml.unknown_token_id", None)
        return cls(
            get("tokenizer.ggml.tokens"),
            get("tokenizer.ggml.token_type"),
            get("tokenizer.ggml.merges"),
            pre=get("tokenizer.ggml.pre"),
            bos_id=get("tokenizer.ggml.bos_token_id"),
            eos_id=get("tokenizer.ggml.eos_token_id"),
            unk_id=None if unk_id is None else int(unk_id),
            add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
            chat_template=get("tokenizer.chat_template", None),
            name=name,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the tokenizer as JSON-serialisable data.

        Lets a compiled artifact carry its tokenizer without the GGUF;
        :meth:`from_dict` rebuilds it.

        Returns
        -------
        dict
            The constructor's arguments.
        """
        return {
            "tokens": self._tokens,
            "token_types": self._token_types,
            "merges": self._merges,
            "pre": self._pre,
            "bos_id": self._bos_id,
            "eos_id": self._eos_id,
            "unk_id": self._unk_id,
            "add_bos": self._add_bos,
            "chat_template": self._chat_template_source,
            "name": self._name,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tokenizer:
        """Rebuild a tokenizer from :meth:`to_dict` output.

        Parameters
        ----------
        data : Mapping
            As returned by :meth:`to_dict` (e.g. after a JSON round trip).

        Returns
        -------
        Tokenizer
        """
        data = dict(data)
        return cls(data.pop("tokens"), data.pop("token_types"), data.pop("merges"), **data)

    # --------------------------------------------------------------- properties

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence token id."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """End-of-sequence token id."""
        return self._eos_id

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary."""
        return len(self._id_to_bytes)

    @property
    def eot_ids(self) -> frozenset[int]:
        """Ids that end an assistant turn: EOS, ``<|im_end|>`` and ``<|endoftext|>`` if present."""
        return self._eot_ids

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of control, user-defined and unknown tokens."""
        return self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """Return the raw bytes a token stands for.

        Parameters
        ----------
        token_id : int

        Returns
        -------
        bytes
            May be an incomplete UTF-8 sequence (byte-level BPE splits
            characters).
        """
        return self._id_to_bytes[token_id]

    # ----------------------------------------------------------------- encoding

    def encode(self, text: str, *, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Convert text to token ids.

        Parameters
        ----------
        text : str
        add_bos : bool or None, optional
            Prepend :attr:`bos_id`; ``None`` uses the GGUF's
            ``tokenizer.ggml.add_bos_token`` (False for SmolLM2).
        parse_special : bool, optional
            Recognise control tokens such as ``<|im_start|>`` written in the
            text. When False they are encoded as ordinary text, which is what
            untrusted user content needs. User-defined tokens are always
            recognised, as in llama.cpp.

        Returns
        -------
        list[int]
        """
        ids = [self._bos_id] if (self._add_bos if add_bos is None else add_bos) else []
        specials = self._specials if parse_special else self._always_special
        for fragment in self._split_specials(text, specials):
            if isinstance(fragment, int):
                ids.append(fragment)
            else:
                self._encode_ordinary(fragment, ids)
        return ids

    @staticmethod
    def _split_specials(text: str, specials: list[tuple[str, int]]) -> list[str | int]:
        """Cut special tokens out of ``text``, longest token first.

        Returns a list of text fragments and special ids in text order.
        """
        fragments: list[str | int] = [text] if text else []
        for special, tid in specials:
            if not any(isinstance(f, str) and special in f for f in fragments):
                continue
            out: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or special not in fragment:
                    out.append(fragment)
                    continue
                for k, part in enumerate(fragment.split(special)):
                    if k:
                        out.append(tid)
                    if part:
                        out.append(part)
            fragments = out
        return fragments

    def _pre_tokenize(self, text: str) -> list[str]:
        """Split ordinary text into pre-tokens.

        Each regex is applied inside every piece the previous one produced,
        keeping both matches and the text between them (llama.cpp's
        ``unicode_regex_split``), so a later regex never sees across an
        earlier cut: e.g. ``\\s+(?!\\S)`` treats a following digit as the end.
        """
        pieces = [text]
        for pattern in self._pre_regexes:
            # split() with one capture group returns gaps and matches
            # alternately; empty strings are dropped.
            pieces = [p for piece in pieces for p in pattern.split(piece) if p]
        return pieces

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        """Append the ids of special-free ``text`` to ``out``."""
        cache = self._cache
        for piece in self._pre_tokenize(text):
            ids = cache.get(piece)
            if ids is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                # latin-1 turns each UTF-8 byte into the character with that
                # ordinal, so one str.translate maps bytes to GPT-2 characters.
                word = piece.encode("utf-8").decode("latin-1").translate(_BYTE_TO_CHAR)
                ids = cache[piece] = self._bpe(word)
            out.extend(ids)

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Merge one pre-token (in GPT-2 byte characters) by BPE rank.

        Repeatedly merges every occurrence of the lowest-rank adjacent pair,
        as GPT-2 and HF do; for well-formed merge lists this matches
        llama.cpp's priority-queue order.
        """
        symbols = list(word)
        ranks = self._ranks
        while len(symbols) > 1:
            best_rank = None
            best_pair = None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_pair = rank, pair
            if best_pair is None:
                break
            left, right = best_pair
            merged: list[str] = []
            i, n = 0, len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == left and symbols[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged

        ids: list[int] = []
        for symbol in symbols:
            tid = self._token_to_id.get(symbol)
            if tid is not None:
                ids.append(tid)
                continue
            # A merge result missing from the vocabulary: fall back to one
            # token per byte, as llama.cpp does.
            for char in symbol:
                tid = self._token_to_id.get(char, self._unk_id)
                if tid is None:
                    raise ValueError(
                        f"{self._name}: byte {_CHAR_TO_BYTE[char]:#04x} has no token "
                        "and the GGUF defines no unknown token"
                    )
                ids.append(tid)
        return tuple(ids)

    # ----------------------------------------------------------------- decoding

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Convert token ids back to text.

        Parameters
        ----------
        ids : iterable of int
        skip_special : bool, optional
            Leave out control/user-defined tokens (e.g. ``<|im_end|>``).

        Returns
        -------
        str
            The concatenated token bytes decoded as UTF-8; invalid or
            truncated sequences become U+FFFD.
        """
        table = self._id_to_bytes
        if skip_special:
            special = self._special_ids
            data = b"".join(table[i] for i in ids if i not in special)
        else:
            data = b"".join(table[i] for i in ids)
        return data.decode("utf-8", errors="replace")

    # ------------------------------------------------------------ chat template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the GGUF's own Jinja chat template.

        The template runs in an immutable sandbox with the same environment
        settings and helpers as HF ``transformers`` (``trim_blocks``,
        ``lstrip_blocks``, ``raise_exception``, ``strftime_now``), so
        templates written for it render identically. Without a template in
        the GGUF, plain ChatML is used.

        Parameters
        ----------
        messages : list of dict
            Each with ``"role"`` and ``"content"``.
        add_generation_prompt : bool, optional
            Append the header that starts the assistant's reply.

        Returns
        -------
        str
            The prompt text; encode it with ``parse_special=True``.

        Raises
        ------
        ValueError
            If the template raises (e.g. an unsupported role).
        """
        import jinja2

        if self._chat_template is None:
            self._chat_template = self._compile_chat_template()
        try:
            return self._chat_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._id_to_bytes[self._bos_id].decode("utf-8", errors="replace"),
                eos_token=self._id_to_bytes[self._eos_id].decode("utf-8", errors="replace"),
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"{self._name}: chat template failed: {exc}") from exc

    def _compile_chat_template(self) -> Any:
        """Compile the chat template in a sandboxed Jinja environment."""
        import jinja2.ext
        import jinja2.sandbox

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        def tojson(value: Any, indent: int | None = None) -> str:
            # Jinja's built-in tojson HTML-escapes; chat prompts must not be.
            return json.dumps(value, ensure_ascii=False, indent=indent)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        return env.from_string(self._chat_template_source or _CHATML_TEMPLATE)

    def __repr__(self) -> str:
        return f"Tokenizer({self._name!r}, pre={self._pre!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Turn generated token ids into text as they arrive.

    Byte-level BPE can split one UTF-8 character over several tokens (emoji,
    CJK), so decoding token by token would print replacement characters. This
    keeps the incomplete tail of a character until the bytes that finish it
    arrive, and only returns complete text.

    Parameters
    ----------
    tokenizer : Tokenizer
    skip_special : bool, optional
        Produce no text for control/user-defined tokens.

    Examples
    --------
    >>> stream = StreamDecoder(tok)  # doctest: +SKIP
    >>> for tid in generated:  # doctest: +SKIP
    ...     print(stream.push(tid), end="")
    >>> print(stream.flush())  # doctest: +SKIP
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly ``""``)."""
        if self._skip_special and token_id in self._tokenizer.special_ids:
            return ""
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End the stream; a dangling partial character becomes U+FFFD."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
