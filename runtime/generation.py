"""Choosing the next token and knowing when to stop: sampling like transformers' `generate` and
llama.cpp (repetition penalty, temperature, top-k, top-p, a seeded generator; temperature 0 is
greedy), end-of-sequence ids and stop strings, and the text of a generation as it grows.
NumPy only: this runs on the board."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from moetvm.errors import MoetvmError


class GenerationError(MoetvmError, ValueError):
    """A generation request that cannot be served as asked (bad sampling values, no tokenizer)."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits. temperature 0: greedy (the highest logit, the
    other fields but repetition_penalty unused)."""

    temperature: float = 0.0
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the most likely tokens whose probabilities sum to top_p (1: all)
    repetition_penalty: float = 1.0  # > 1 lowers every token already in the prompt or the output (CTRL's rule)
    seed: int | None = None  # the same seed, prompt and artifact give the same tokens

    def __post_init__(self):
        def number(name, value, ok, rule):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
                raise GenerationError(f"{name} must be {rule}, got {value!r}")
        number("temperature", self.temperature, lambda v: v >= 0, "a number >= 0")
        number("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        number("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "a number > 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or not 0 <= self.seed < 2**64):
            raise GenerationError(f"seed must be an integer in [0, 2^64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Sampling applied to one position's logits, with its own random generator."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        # Greedy decoding draws nothing: numpy.random (7 MB of RSS on import) is not loaded for it.
        self.rng = None if sampling.greedy else np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        s = self.sampling
        if s.greedy and s.repetition_penalty == 1.0:
            return int(np.argmax(logits))  # (in float32: a float64 copy of 49k logits is ~20 us a token)
        logits = np.asarray(logits, np.float64)
        if s.repetition_penalty != 1.0 and history:
            seen = np.unique(np.asarray(history, np.int64))
            scores = logits[seen]
            logits = logits.copy()
            logits[seen] = np.where(scores > 0, scores / s.repetition_penalty, scores * s.repetition_penalty)
        if s.greedy:
            return int(np.argmax(logits))
        logits = logits / s.temperature
        if 0 < s.top_k < logits.size:
            kth = np.partition(logits, -s.top_k)[-s.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if s.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, s.top_p)) + 1]  # the smallest set reaching top_p
            kept = np.zeros_like(probs)
            kept[keep] = probs[keep]
            probs = kept / kept.sum()
        return int(self.rng.choice(probs.size, p=probs))


@dataclass(frozen=True)
class Token:
    id: int | None  # None: the end of the text, held back until the generation ended (no new token)
    text: str  # the text this token adds, as far as it is final (may be "": held back)


class StopStrings:
    """Finds the first stop string in the generated text. Text that could still turn out to be the
    start of a stop string is held back, so nothing after a stop is ever shown."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = tuple(s for s in stop if s)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text now safe to show, whether a stop string was found)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((n for s in self.stop for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:n])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Generation:
    """One generation, iterated for its `Token`s as they are made (the model computes the next
    token only when asked). Afterwards: `token_ids`, `text`, `finish_reason` ("stop": an
    end-of-sequence id or a stop string; "length": max_new_tokens reached), `prompt_tokens`."""

    def __init__(self, ids: Iterator[int], prompt_tokens: int, eos_ids=(), stop: tuple[str, ...] = (),
                 decoder=None):
        self._ids, self._eos, self._decoder = ids, frozenset(eos_ids), decoder
        self._stop = StopStrings(stop) if stop else None
        self.prompt_tokens = prompt_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[Token]:
        reason = "length"
        for token_id in self._ids:
            self.token_ids.append(token_id)
            text, hit = self._shown(self._decoder.step(token_id) if self._decoder else "")
            yield Token(token_id, text)
            if hit:
                self.finish_reason = "stop"
                return
            if token_id in self._eos:
                reason = "stop"
                break
        # The end: what the decoder held back (a character whose bytes never all came), then what
        # was held for a stop string that never came.
        text, hit = self._shown(self._decoder.finish() if self._decoder else "")
        if not hit and self._stop is not None:
            tail = self._stop.flush()
            self.text += tail
            text += tail
        if text:
            yield Token(None, text)
        self.finish_reason = "stop" if hit else reason

    def _shown(self, text: str) -> tuple[str, bool]:
        """The part of new text to show (all of it, or up to a stop string), added to .text."""
        hit = False
        if self._stop is not None:
            text, hit = self._stop.feed(text)
        self.text += text
        return text, hit

    def run(self, each: Callable[[Token], None] | None = None) -> "Generation":
        """Generate to the end, calling `each` with every token as it comes."""
        for token in self:
            if each is not None:
                each(token)
        return self
