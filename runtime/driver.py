"""The host driver: tokenize, prefill, decode loop, sampling, streaming.

Backend-independent: it talks to a :class:`~flightllm.runtime.device.Device` only
through the protocol (token buffer, POS/LEN registers, start/wait, logits and the
ARGMAX register), so the golden model, the RTL simulation and the board run the
same code.

Sampling (``Sampler``): greedy when ``temperature == 0``; otherwise logits / T,
then top-k (keep the k largest), then top-p (smallest set of most probable tokens
whose probability reaches p), then one draw from ``numpy.random.default_rng(seed)``.
Greedy reads the device's ARGMAX register (lowest index of the maximum).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from ..compiler.artifact import Artifact
from .device import open_device

__all__ = ["Sampler", "Driver", "GenerationError"]


class GenerationError(ValueError):
    pass


@dataclass
class Sampler:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"--temperature must be >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0, not {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], not {self.top_p}")
        self.rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def sample(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        if self.top_k and self.top_k < z.size:
            kth = np.partition(z, -self.top_k)[-self.top_k]
            z = np.where(z >= kth, z, -np.inf)
        z = z - z.max()
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[:int(np.searchsorted(cum, self.top_p)) + 1]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(self.rng.choice(p.size, p=p))


class Driver:
    """Runs an artifact's programs on a device.

    Parameters
    ----------
    artifact : Artifact or path
    backend : str or Device
    """

    def __init__(self, artifact, backend="golden", params=None):
        from ..compiler.tokenizer import Tokenizer

        self.artifact = artifact if isinstance(artifact, Artifact) else Artifact(artifact)
        self.dev = open_device(backend, params) if isinstance(backend, str) else backend
        self.dev.load(self.artifact)
        self.tok = Tokenizer.from_dict(json.loads(self.artifact.read("tokenizer.json")))
        plan = self.artifact.manifest["programs"]["plan"]
        self.max_seq = plan["max_seq"]
        self.vocab = plan["vocab"]
        self.pos = 0                     # tokens in the KV cache
        self.cached = []                 # their ids
        self.stats = []

    def reset(self):
        self.pos, self.cached = 0, []

    def check_room(self, n_prompt: int, n_new: int):
        if n_prompt + n_new > self.max_seq:
            raise GenerationError(f"prompt of {n_prompt} tokens + {n_new} new tokens exceeds the artifact's "
                                  f"maximum sequence length of {self.max_seq}")

    def prefill(self, ids, all_logits: bool = False) -> np.ndarray:
        """Append ``ids`` to the cache; logits of the last token (or of all, (n, vocab)).

        The last token's logits come from the ``prefill_last`` program, which runs the
        LM head for that token only (bit-identical to row ``n - 1`` of ``prefill``);
        ``all_logits`` (perplexity) runs ``prefill``, which computes every row.
        """
        ids = list(map(int, ids))
        if not ids:
            raise GenerationError("empty prompt")
        if self.pos + len(ids) > self.max_seq:
            raise GenerationError(f"{self.pos + len(ids)} tokens exceed the artifact's maximum sequence "
                                  f"length of {self.max_seq}")
        if min(ids) < 0 or max(ids) >= self.vocab:
            raise GenerationError(f"token id out of range 0..{self.vocab - 1}")
        d = self.dev
        d.write_tokens(self.pos, ids)
        d.write_reg("POS", self.pos)
        d.write_reg("LEN", len(ids))
        last = not all_logits and d.has_program("prefill_last")
        d.start("prefill_last" if last else "prefill")
        self.stats.append(("prefill", len(ids), d.wait()))
        self.pos += len(ids)
        self.cached += ids
        self.last_argmax = d.read_reg("ARGMAX")
        if all_logits:
            return d.read_logits(0, len(ids))
        return d.read_logits(0 if last else len(ids) - 1, 1)[0]

    def step(self, token: int, need_logits: bool = True):
        """Decode one token at the next position; its logits (or None) and the argmax."""
        if self.pos + 1 > self.max_seq:
            raise GenerationError(f"KV cache full ({self.max_seq} positions)")
        d = self.dev
        d.write_tokens(self.pos, [token])
        d.write_reg("POS", self.pos)
        d.write_reg("LEN", 1)
        d.start("decode")
        self.stats.append(("decode", 1, d.wait()))
        self.pos += 1
        self.cached.append(int(token))
        self.last_argmax = d.read_reg("ARGMAX")
        return d.read_logits(0, 1)[0] if need_logits else None

    def generate(self, prompt_ids, max_new_tokens: int, sampler: Sampler | None = None,
                 stop_ids=None, reuse_cache: bool = False):
        """Yield generated token ids one by one (streaming)."""
        sampler = sampler or Sampler()
        stop = set(self.tok.eot_ids if stop_ids is None else stop_ids)
        prompt_ids = list(prompt_ids)
        if reuse_cache and self.cached and prompt_ids[:len(self.cached)] == self.cached \
                and len(prompt_ids) > len(self.cached):
            new = prompt_ids[len(self.cached):]
        else:
            self.reset()
            new = prompt_ids
        self.check_room(self.pos + len(new), max_new_tokens)
        logits = self.prefill(new)
        for n in range(max_new_tokens):
            nxt = self.last_argmax if sampler.greedy else sampler.sample(logits)
            if nxt in stop:
                return
            yield nxt
            if n + 1 == max_new_tokens:
                # the token is not run through the model; keep the cache consistent
                return
            logits = self.step(nxt, need_logits=not sampler.greedy)

    def nll_windows(self, tokens, context: int, progress=None):
        """Perplexity protocol of :func:`flightllm.compiler.reference.windows_nll` on the device."""
        from ..compiler.reference import windows_nll

        if context > self.max_seq:
            raise GenerationError(f"--context {context} exceeds the artifact's maximum sequence length {self.max_seq}")

        def fn(w):
            self.reset()
            return self.prefill(w, all_logits=True)
        return windows_nll(fn, tokens, context, progress)
