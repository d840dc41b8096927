"""Sampling options and their validation: `check_options` is the one place a sampling value is
checked (Generator, the generate and eval commands, and the server call it). No jax imported here."""

from __future__ import annotations

import dataclasses

from codegen_jax.errors import UserError


@dataclasses.dataclass
class SamplingOptions:
    """What one `generate` call asks for, defaults resolved from the SampleConfig."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    num_samples: int
    stop: list[str]
    seed: int
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0


def check_options(max_new_tokens: int | None = None, temperature: float | None = None,
                  top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                  num_samples: int | None = None, repetition_penalty: float | None = None,
                  no_repeat_ngram: int | None = None) -> None:
    """Raise a one-line UserError for the first out-of-range value (None = not given, skipped)."""
    problems = [
        (max_new_tokens is not None and max_new_tokens < 1,
         f"max_new_tokens must be >= 1; got {max_new_tokens}"),
        (temperature is not None and not temperature >= 0,
         f"temperature must be >= 0 (0 = greedy); got {temperature}"),
        (top_k is not None and top_k < 0, f"top_k must be >= 0 (0 = off); got {top_k}"),
        (top_p is not None and not 0 < top_p <= 1, f"top_p must be in (0, 1]; got {top_p}"),
        (min_p is not None and not 0 <= min_p <= 1, f"min_p must be in [0, 1]; got {min_p}"),
        (num_samples is not None and num_samples < 1, f"num_samples must be >= 1; got {num_samples}"),
        (repetition_penalty is not None and not repetition_penalty > 0,
         f"repetition_penalty must be > 0 (1 = off); got {repetition_penalty}"),
        (no_repeat_ngram is not None and no_repeat_ngram < 0,
         f"no_repeat_ngram must be >= 0 (0 = off); got {no_repeat_ngram}"),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(message)
