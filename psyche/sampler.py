"""Rollout sampling with a KV cache: `generate` around psyche/decode.py's prefill, decode step and sampling
(re-exported here), on the eager path or psyche/static_decode.py's.

What `generate` returns for each completion is what GRPO needs: the sampled token ids, the log-prob of
each under the distribution it was drawn from, a mask, the length, and whether it ended on a stop token.

Log-prob convention: the reported log-prob is log softmax(logits / temperature)[token], i.e. *after*
temperature and *before* top-k / top-p / min-p truncation. The trainer recomputes log-probs as a full
softmax at the same temperature, so this is the quantity whose ratio GRPO takes; with truncation the
reported value is the log-prob of the untruncated tempered distribution (truncation only decides which
tokens can be drawn). With temperature 0 (greedy) it is the log-prob at temperature 1.

Randomness: each completion row r has its own seed; at step t it draws one uniform u = hash(seed_r, t)
and takes the token by inverse CDF. A row's samples therefore do not depend on which other rows share the
batch, which rows have finished, or the device: G rows of one prompt equal G single-row runs with the
same row seeds.

The decode step is the same on every path (psyche/decode.py: `decode_step` = `decode_one_token` + `record`,
the one per-token bookkeeping), and so is the host's look at the decode every few tokens (`Decoder.check`:
streaming, cancelling, the non-finite check, shrinking the batch). The two paths differ only in how:
- eager (the reference): a KVCache whose visible length grows; the host looks after every token; finished
  rows are dropped from the cache (compaction).
- static (psyche/static_decode.py): a few fixed batch sizes over a preallocated cache seen whole, so the step
  can be replayed as a CUDA graph captured per shape ("graph") or compiled ("compiled"); the host looks every
  STOP_CHECK_EVERY tokens and moves the running rows to a batch half the size once most have ended
  (rebucketing).
`generate(..., path=...)` chooses: "eager", "static" (plain calls), "graph", "compiled", or "auto" (the default:
the environment variable PSYCHE_SAMPLER if set, else "graph" on CUDA and "eager" on CPU, where nothing is
captured and the static path's fixed shapes cost more than they save).
"""

from __future__ import annotations

import contextlib
import os

import torch

from psyche.config import SamplingParams
from psyche.decode import (GREEDY, DecodeState, EagerDecoder, Job, NonFiniteLogitsError,  # noqa: F401 (the API)
                           Rollout, decode_one_token, decode_step, prefill, record, row_seeds, sample, splitmix64,
                           uniforms)
from psyche.kv_cache import KVCache
from psyche.static_decode import decode_static

# ---- generate ----

PATHS = ("auto", "eager", "static", "graph", "compiled")


def resolve_path(path: str, device: torch.device) -> str:
    from psyche.config import ConfigError

    if path not in PATHS:
        raise ValueError(f"sampler path must be one of {PATHS}, got {path!r}")
    if path == "auto":
        path = os.environ.get("PSYCHE_SAMPLER", "auto")
        if path not in PATHS:
            raise ConfigError(f"PSYCHE_SAMPLER={path!r}: must be one of {', '.join(PATHS)}")
    if path == "auto":
        return "graph" if device.type == "cuda" else "eager"
    return path


@torch.no_grad()
def generate(model, prompts: list[list[int]], n: int = 1, max_new_tokens: int = 256, *,
             sampling: SamplingParams | None = None, stop_token_ids=None, seed: int | torch.Tensor = 0,
             pad_id: int = 0, row_max_tokens: torch.Tensor | None = None, on_token=None, should_end=None,
             compact_below: float = 0.75, path: str = "auto", **sampling_kw) -> Rollout:
    """Sample n completions for each prompt (lists of token ids, any lengths).

    sampling: a SamplingParams (or its fields as keywords: temperature=..., top_p=..., top_k=..., min_p=...).
    stop_token_ids: a row ends when it emits any of them (the stop token is kept in the completion).
    seed: an int (row r's seed is row_seeds(seed, N)[r]), or the (N,) int64 per-row seeds themselves.
    row_max_tokens: optional (N,) per-row limits (<= max_new_tokens): a row ends after that many tokens.
    on_token: optional callback(step, row_ids (B,), tokens (B,)) for each sampling step, in order (streaming), at
        the host's next look at the decode (every token on the eager path, every STOP_CHECK_EVERY on the static).
    should_end: optional callback(row_ids (B,)) -> (B,) bool: rows to end now (a server's cancelled requests),
        asked at the same looks. A row ended by a limit or by should_end is not `finished`.
    compact_below: when fewer than this fraction of the batch's rows still run, the finished ones leave it so
        they stop costing compute (eager: compacted; static: rebucketed; 0 never).
    path: "auto" | "eager" | "static" | "graph" | "compiled" (see the module docstring).
    """
    sampling = sampling or SamplingParams(**sampling_kw)
    if sampling_kw and sampling != SamplingParams(**sampling_kw):
        raise ValueError("give the sampling settings either as sampling= or as keywords, not both")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device = model.lm_head.weight.device
    P, N = len(prompts), len(prompts) * n
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings ({model.config.max_position_embeddings})")
    seeds = row_seeds(seed, N, device) if isinstance(seed, int) else seed.to(device)
    job = Job(P, n, max_new_tokens, sampling, pad_id,
              torch.tensor(sorted(set(stop_token_ids or [])), dtype=torch.long, device=device), seeds,
              None if row_max_tokens is None else row_max_tokens.to(device, torch.long).clamp(max=max_new_tokens),
              on_token, should_end, compact_below)
    path = resolve_path(path, device)
    with cpu_head_layout(model):
        return _generate(model, prompts, job, path)


def _generate(model, prompts, job: Job, path: str) -> Rollout:
    """Prefill the prompts once, then decode their n rows each on `path`."""
    longest = max(len(p) for p in prompts)
    small = KVCache.for_model(model, job.P, longest)
    logits = prefill(model, small, prompts)  # (P, V)
    if path != "eager":
        return decode_static(model, small, logits, job, path)
    N = job.N
    cache = KVCache.for_model(model, N, longest + job.max_new_tokens)
    cache.fork_from(small, job.n)
    s = DecodeState.empty(N, job.max_new_tokens, max(len(job.stop), 1), job.pad_id, logits.device)
    s.seeds.copy_(job.seeds)
    if job.limits is None:
        s.limit.fill_(job.max_new_tokens)
    else:
        s.limit.copy_(job.limits)
    s.alive.fill_(True)
    s.stop[:len(job.stop)] = job.stop
    return EagerDecoder(model, cache, s, job).run(logits.repeat_interleave(job.n, dim=0))


HEAD_LAYOUT_MIN = 1 << 22  # lm_head weights of at least this many elements get the column-major decode copy


@contextlib.contextmanager
def cpu_head_layout(model):
    """On CPU, logits = h @ Wᵀ with W (V, C) stored row-major (as a tied embedding is) is a slow BLAS case for
    a few rows h: with W stored column-major the same product runs 1.8x faster at V = 151,936, C = 896
    (0.5B-shaped decode step 89 -> 60 ms on a 2-core CPU; bench/sampler.py). For the duration of a
    generate call the head uses a column-major copy of its weight (same values; one extra copy of the head
    in memory); the model's own parameters are untouched. Unsharded CPU models with a large head only."""
    head = getattr(model, "lm_head", None)
    w = getattr(head, "weight", None)
    from psyche.dist import is_sharded

    if (w is None or w.device.type != "cpu" or w.numel() < HEAD_LAYOUT_MIN or type(w) is not torch.nn.Parameter
            or is_sharded(model)):
        yield
        return
    head.weight = torch.nn.Parameter(w.detach().t().contiguous().t(), requires_grad=False)
    try:
        yield
    finally:
        head.weight = w



@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[list[int]], *, sampling: SamplingParams = GREEDY,
                   seed: int | torch.Tensor = 0, batch_size: int = 64, max_new_tokens: int = 256,
                   log=None) -> list[str]:
    """One decoded reply per prompt (special tokens dropped), in prompt order: prompts go in batches of similar
    length, row i sampled with seed `seed[i]` (an int: row_seeds(seed, len(prompts))[i]) whatever batch it lands
    in, so the replies do not depend on the batch size. Greedy by default. log(line): told about each batch.
    The one "prompts -> seeded rows -> generate -> texts" helper (evaluation, the demo, the task's grading);
    GRPO calls `generate` itself because it keeps the Rollout's log-probs, and chat and serve stream tokens."""
    seeds = row_seeds(seed, len(prompts)) if isinstance(seed, int) else seed
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    was_training = model.training
    model.eval()
    n_batches = -(-len(order) // batch_size)
    for b, s in enumerate(range(0, len(order), batch_size)):
        idx = order[s:s + batch_size]
        r = generate(model, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, sampling=sampling,
                     stop_token_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id, seed=seeds[idx])
        for j, i in enumerate(idx):
            out[i] = tokenizer.decode(r.tokens[j, : r.lengths[j]].tolist(), skip_special_tokens=True)
        if log is not None:
            log(f"batch {b + 1}/{n_batches}: {len(idx)} prompts of up to {len(prompts[idx[-1]])} tokens")
    model.train(was_training)
    return out
