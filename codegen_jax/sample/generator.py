"""`Generator`: text prompts in, completions out, over the engine and scheduler.

    gen = Generator.from_checkpoint("runs/tiny")
    [[completion]] = gen.generate(["def fib(n):"], max_new_tokens=64)

Each (prompt, sample) pair is one row; rows go through a `Scheduler` with up to `max_batch_size`
slots, longest prompts first. With `continuous` (the default) a slot is refilled as soon as its row
ends; otherwise rows run in static batches. Results do not depend on either, nor on the mesh: a row's
random stream is keyed by (seed, prompt index, sample index) and the tokens it has sampled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from codegen_jax.config import SampleConfig
from codegen_jax.errors import UserError
from codegen_jax.sample.engine import Engine
from codegen_jax.sample.options import SamplingOptions, check_options
from codegen_jax.sample.scheduler import Request, Scheduler, pow2_at_least


@dataclasses.dataclass
class Completion:
    """One sample for one prompt. `tokens` are the completion's ids (prompt and EOS excluded; with a
    stop string, up to the token in which the stop string starts, so `decode(tokens)` starts with
    `text`)."""

    text: str
    tokens: list[int]
    finish_reason: str  # stop | eos | length
    prompt_index: int = 0
    sample_index: int = 0


class Generator:
    """Generates completions with a Decoder: `Generator(model, tokenizer, mesh)` for a model in memory,
    `Generator.from_checkpoint(DIR)` for a saved run. Compiled programs are kept by the engine;
    `last_stats` reports the compile and run time of the latest `generate` call separately."""

    def __init__(self, model: nnx.Module, tokenizer: Any, mesh: jax.sharding.Mesh | None = None, *,
                 sample_cfg: SampleConfig | None = None, max_batch_size: int = 64, add_bos: bool = True,
                 stop_check_every: int = 32, continuous: bool = True):
        self.engine = Engine(model, mesh)  # params laid out by the rules table on `mesh`
        self.model_cfg, self.tokenizer, self.mesh = self.engine.model_cfg, tokenizer, mesh
        self.sample_cfg = sample_cfg or SampleConfig()
        dp = self.engine.dp
        self.max_batch_size = -(-max_batch_size // dp) * dp
        self.add_bos, self.stop_check_every, self.continuous = add_bos, stop_check_every, continuous
        self.last_stats: dict[str, float] = {}

    @classmethod
    def from_checkpoint(cls, path: str | Path, mesh: jax.sharding.Mesh | None = None, **kwargs: Any
                        ) -> Generator:
        """Load a run dir (latest step) or a step dir; tokenizer, model and sampling defaults come from
        the checkpoint. Default mesh: every device on the data axis."""
        from codegen_jax.checkpoint import load_inference
        from codegen_jax.sharding import make_mesh

        if mesh is None:
            mesh = make_mesh({"data": jax.device_count(), "fsdp": 1, "tensor": 1})
        cfg, model, tokenizer, step = load_inference(path, mesh)
        gen = cls(model, tokenizer, mesh, sample_cfg=cfg.sample, **kwargs)
        gen.config, gen.step = cfg, step
        return gen

    # -- public entry points ----------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], max_new_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, num_samples: int = 1, stop: Sequence[str] | None = None,
                 seed: int = 0, truncate: bool = False, progress: bool = False,
                 repetition_penalty: float = 1.0, no_repeat_ngram: int = 0) -> list[list[Completion]]:
        """Completions per prompt, per sample. Unset options come from the SampleConfig (`stop=None` ->
        its stop strings; `stop=[]` -> none). `truncate` keeps the end of a prompt too long for the
        context instead of raising. temperature 0 is greedy; `repetition_penalty` (HF's, 1 = off) and
        `no_repeat_ngram` (0 = off) change greedy output too, so they are off by default."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise UserError("prompts must be a list of strings")
        opts = self.options(max_new_tokens, temperature, top_k, top_p, min_p, num_samples, stop, seed,
                            repetition_penalty, no_repeat_ngram)
        ids = [self.prompt_ids(p, opts.max_new_tokens, truncate, i) for i, p in enumerate(prompts)]
        return self._generate(ids, opts, progress=progress)

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], ignore_eos: bool = False, **options: Any
                     ) -> list[list[Completion]]:
        """`generate` on token ids taken as given (no BOS added); `ignore_eos` always runs
        max_new_tokens steps (benchmarks)."""
        opts = self.options(**options)
        ctx = self.model_cfg.max_seq_len
        for i, ids in enumerate(prompt_ids):
            if not 0 < len(ids) <= ctx - opts.max_new_tokens:
                raise UserError(f"prompt {i} has {len(ids)} tokens; 1..{ctx - opts.max_new_tokens} fit")
        return self._generate([list(map(int, x)) for x in prompt_ids], opts, ignore_eos=ignore_eos)

    def options(self, max_new_tokens: int | None = None, temperature: float | None = None,
                top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                num_samples: int = 1, stop: Sequence[str] | None = None, seed: int = 0,
                repetition_penalty: float = 1.0, no_repeat_ngram: int = 0) -> SamplingOptions:
        """Resolve unset options from the SampleConfig and validate them (UserError)."""
        d = self.sample_cfg
        opts = SamplingOptions(
            max_new_tokens=d.max_new_tokens if max_new_tokens is None else int(max_new_tokens),
            temperature=d.temperature if temperature is None else float(temperature),
            top_k=d.top_k if top_k is None else int(top_k), top_p=d.top_p if top_p is None else float(top_p),
            min_p=d.min_p if min_p is None else float(min_p), num_samples=int(num_samples),
            stop=list(d.stop if stop is None else stop), seed=int(seed),
            repetition_penalty=float(repetition_penalty), no_repeat_ngram=int(no_repeat_ngram))
        check_options(opts.max_new_tokens, opts.temperature, opts.top_k, opts.top_p, opts.min_p,
                      opts.num_samples, opts.repetition_penalty, opts.no_repeat_ngram)
        if opts.max_new_tokens >= self.model_cfg.max_seq_len:
            raise UserError(f"max_new_tokens ({opts.max_new_tokens}) must be below the model's context "
                            f"length ({self.model_cfg.max_seq_len}) to leave room for the prompt")
        return opts

    def encode_prompt(self, prompt: str) -> list[int]:
        """The prompt's token ids as the model was trained to see them (`CodeTokenizer.prompt_ids`:
        ours BOS + text with FIM tokens as themselves; an imported tokenizer's own convention), or,
        with `add_bos=False` for one of ours, the text alone (an empty prompt is BOS alone)."""
        ids = self.tokenizer.prompt_ids(prompt)
        if not self.add_bos and self.tokenizer.own and len(ids) > 1:
            ids = ids[1:]
        return ids

    def prompt_ids(self, prompt: str, max_new_tokens: int, truncate: bool = False, index: int = 0
                   ) -> list[int]:
        """`encode_prompt`, checked against the context (or left-truncated to fit with `truncate`,
        keeping a leading BOS)."""
        ids = self.encode_prompt(prompt)
        room = self.model_cfg.max_seq_len - max_new_tokens
        if len(ids) > room:
            if not truncate:
                raise UserError(
                    f"prompt {index} has {len(ids)} tokens but only {room} fit in the model's "
                    f"context of {self.model_cfg.max_seq_len} with max_new_tokens={max_new_tokens}; "
                    "shorten it, lower max_new_tokens, or pass --truncate to keep its end")
            head = ids[:1] if ids[0] == self.tokenizer.bos_id else []
            ids = head + ids[len(ids) - (room - len(head)):]  # left truncation keeps the text nearest the cut
        return ids

    # -- rows through the scheduler ---------------------------------------------------------------

    def _generate(self, prompt_ids: list[list[int]], opts: SamplingOptions, ignore_eos: bool = False,
                  progress: bool = False) -> list[list[Completion]]:
        """Rows = (prompt, sample) pairs, longest prompts first (less padding)."""
        import sys

        from tqdm import tqdm

        rows = [(i, j) for i in range(len(prompt_ids)) for j in range(opts.num_samples)]
        rows.sort(key=lambda r: -len(prompt_ids[r[0]]))
        requests = [Request(prompt_ids[i], opts.max_new_tokens, opts.temperature, opts.top_k, opts.top_p,
                            opts.min_p, opts.repetition_penalty, opts.no_repeat_ngram, opts.stop, opts.seed,
                            key=(i, j)) for i, j in rows]
        slots = pow2_at_least(min(len(rows), self.max_batch_size))
        sched = Scheduler(self.engine, _NoEos(self.tokenizer) if ignore_eos else self.tokenizer, slots,
                          refill=self.continuous, chunk=self.stop_check_every)
        compile0 = self.engine.compile_s
        out: list[list[Completion | None]] = [[None] * opts.num_samples for _ in prompt_ids]
        with tqdm(total=len(rows), disable=not progress, file=sys.stderr, desc="generate", unit="seq",
                  dynamic_ncols=True) as bar:
            for r in requests:
                sched.submit(r)
            while sched.busy:
                for res in sched.step():
                    i, j = res.request.key
                    out[i][j] = Completion(res.text, res.tokens, res.finish_reason, i, j)
                    bar.update(1)
        st = sched.stats
        self.last_stats = {"compile_s": self.engine.compile_s - compile0, "run_s": st["run_s"],
                           "new_tokens": st["new_tokens"], "batches": st["prefills"],
                           "tokens_per_s": st["new_tokens"] / st["run_s"] if st["run_s"] > 0 else 0.0}
        return out  # type: ignore[return-value]


class _NoEos:
    """The tokenizer with no EOS id, so that rows always run their whole budget (benchmarks)."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer

    def __getattr__(self, name: str) -> Any:
        return -1 if name == "eos_id" else getattr(self._tok, name)
