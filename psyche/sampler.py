"""Rollout sampling with a KV cache, in small functions (prefill, decode_one_token, sample, generate).

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

Two decode paths, one contract (the same Rollout, per-row seeds, log-probs, stop tokens kept):
- eager (`generate`'s reference path): the cache's visible length grows, finished rows are compacted away,
  the host looks at every token.
- static: a batch of a few fixed sizes over a preallocated cache seen whole (StaticKVCache), positions, stop
  flags and lengths on the device, one `static_step` per token that `torch.compile` can compile whole (and, on
  CUDA, replay as a CUDA graph: its buffers are pooled, so the addresses stay), and one host sync every
  STOP_CHECK_EVERY tokens, where the tokens since the last sync are streamed, cancelled rows end, and the
  running rows move to a batch half the size once most have ended (rebucketing, instead of compaction).
Both take every argument (streaming with on_token, cancelling with should_end, per-row limits); the static
path hands the callbacks STOP_CHECK_EVERY tokens at a time, the eager one each token.
`generate(..., path=...)` chooses: "eager", "static" (uncompiled), "compiled", or "auto" (the default: the
environment variable PSYCHE_SAMPLER if set, else "compiled" on CUDA and "eager" on CPU, where compiling costs
seconds per new shape).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

from psyche.kv_cache import KVCache, StaticKVCache

_MASK64 = (1 << 64) - 1


def _i64(c: int) -> int:
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _lsr(x, s):  # logical shift right on int64 tensors
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """A counter-based 64-bit hash (wrapping int64 arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ _lsr(z, 30)) * _MIX1
    z = (z ^ _lsr(z, 27)) * _MIX2
    return z ^ _lsr(z, 31)


_FNV_PRIME = 0x100000001B3  # the 64-bit FNV prime: odd, so seed -> seed * p (mod 2^64) is a bijection


def row_seeds(seed: int, n_rows: int, device="cpu") -> torch.Tensor:
    """Seeds of rows 0..n_rows-1 of a call seeded `seed`: hash(seed · p + row). Consecutive seeds start their
    rows p apart, so the rows of two seeds of one run never share a counter (for fewer than p rows)."""
    return splitmix64(torch.arange(n_rows, dtype=torch.long, device=device) + _i64(seed * _FNV_PRIME))


def uniforms(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One U[0, 1) per row for decode step `step`, float64."""
    h = splitmix64(seeds ^ splitmix64(torch.zeros_like(seeds) + step))  # step: an int or a 0-d tensor
    return _lsr(h, 11).double() / float(1 << 53)


@dataclass
class Rollout:
    """N = len(prompts) * n completions, prompt order, the n samples of a prompt consecutive."""

    tokens: torch.Tensor  # (N, L) completion ids, pad_id after the end
    logprobs: torch.Tensor  # (N, L) fp32 log-prob of each sampled token (0 where mask is 0)
    mask: torch.Tensor  # (N, L) bool, True on completion tokens including the stop token
    lengths: torch.Tensor  # (N,) completion lengths
    finished: torch.Tensor  # (N,) bool: ended on a stop token (False = truncated at max_new_tokens)
    prompt_index: torch.Tensor  # (N,) which prompt each row continues

    def texts(self, tokenizer, skip_special_tokens=False) -> list[str]:
        return [tokenizer.decode(self.tokens[i, : self.lengths[i]].tolist(), skip_special_tokens)
                for i in range(len(self.lengths))]


def sample(logits, u, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """logits (B, V), u (B,) uniforms -> (tokens (B,), logprobs (B,) fp32); see the module docstring."""
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)  # (B, V): the distribution we report
    probs = logp.exp()
    if top_k and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs >= kth, probs, 0.0)
    if min_p > 0:
        probs = torch.where(probs >= min_p * probs.max(-1, keepdim=True).values, probs, 0.0)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        sorted_p = torch.where(before < top_p * sorted_p.sum(-1, keepdim=True), sorted_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    cdf = probs.double().cumsum(-1)  # (B, V)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    tok = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def prefill(model, cache: KVCache, prompts: list[list[int]]) -> torch.Tensor:
    """Run right-padded prompts through an empty cache; return each row's last-position logits (B, V)."""
    device = cache.lengths.device
    lens = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    hidden = model(ids, kv_cache=cache, return_hidden=True)  # (B, T, C)
    cache.set_lengths(lens)
    last = hidden[torch.arange(len(prompts), device=device), lens - 1]  # (B, C)
    return model.lm_head(last)


def decode_one_token(model, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B,) -> next-token logits (B, V); writes them into the cache."""
    logits = model(tokens[:, None], kv_cache=cache)[:, -1]
    cache.advance(1)
    return logits


STOP_CHECK_EVERY = 8  # static path: tokens between the host's checks (one sync each): have all rows ended, which
#                       rows to stream, cancel or drop
CACHE_MIN = 128  # static path: cache lengths are 2^k or 1.5 * 2^k from this (at most a third of the slots
#                  wasted), so calls share a few compiled steps (each new shape compiles once)
REBUCKET_MIN = 8  # static path: the batch is never rebucketed below this many rows (a decode step of 8 rows costs
#                   about what one of 1 does on a GPU: the weights are read once either way)
RECOMPILE_LIMIT = 64  # shapes a compiled decode step may take in one process (torch's default, 8, is too few for
#                       batch sizes x cache lengths; under fullgraph, running past it is an error)
POOL_MAX = 8  # static path: idle buffer sets kept for reuse (a CUDA graph replays on the addresses it recorded),
POOL_BYTES = 4 << 30  # and at most this many bytes of them: a larger KV cache is freed after its decode (GRPO's
#                       update then has the memory; the next decode allocates it again and re-records its graph)
PATHS = ("auto", "eager", "static", "compiled")


def ladder(n: int, start: int) -> int:
    """The smallest size >= n on the ladder start, ..., 2^k, 1.5 * 2^k, 2^(k+1), ... (doubling below 8)."""
    s = start
    while s < n:
        s = s * 2 if s < 8 else s * 3 // 2 if s & (s - 1) == 0 else s * 4 // 3
    return s


def static_step(model, cache: StaticKVCache, tok, t, seeds, alive, lengths, finished, tokens, logprobs, stop,
                limit, pad_id: int, temperature: float, top_k: int, top_p: float, min_p: float):
    """Decode step t of the static path, all on the device and all in place: feed each row's last token `tok`,
    sample the next one into `tok`, record it for the rows still alive, t += 1.

    tok (B,) last tokens; t 0-d long tensor; alive / finished (B,) bool; lengths (B,) long; tokens, logprobs
    (B, L) the outputs; stop (S,) stop ids (-1 pads); limit (B,) per-row token budgets. A row that has ended
    still runs (the batch is fixed) but nothing of it is recorded. Returns nothing: every input keeps its
    address, so a CUDA graph of this step replays with no copies in or out."""
    logits = model(tok[:, None], kv_cache=cache)[:, -1]
    cache.lengths += 1
    record_step(logits, tok, t, seeds, alive, lengths, finished, tokens, logprobs, stop, limit, pad_id,
                temperature, top_k, top_p, min_p)


def record_step(logits, tok, t, seeds, alive, lengths, finished, tokens, logprobs, stop, limit, pad_id: int,
                temperature: float, top_k: int, top_p: float, min_p: float):
    u = uniforms(seeds, t) if temperature > 0 else None
    new, lp = sample(logits, u, temperature, top_k, top_p, min_p)
    col = t.view(1)
    tokens.index_copy_(1, col, torch.where(alive, new, pad_id)[:, None])
    logprobs.index_copy_(1, col, torch.where(alive, lp, 0.0)[:, None])
    lengths.add_(alive.long())
    hit = alive & torch.isin(new, stop)
    finished.logical_or_(hit)
    alive.logical_and_(~hit & (lengths < limit))
    tok.copy_(new)
    t.add_(1)


_COMPILED = {}
_NOT_COMPILABLE: dict = {}  # fn -> why torch.compile could not take it (warned once, then run uncompiled)
HEAD_LAYOUT_MIN = 1 << 22  # lm_head weights of at least this many elements get the column-major decode copy


@contextlib.contextmanager
def cpu_head_layout(model):
    """On CPU, logits = h @ Wᵀ with W (V, C) stored row-major (as a tied embedding is) is a slow BLAS case for
    a few rows h: with W stored column-major the same product runs 1.8x faster at V = 151,936, C = 896
    (0.5B-shaped decode step 89 -> 60 ms on this 2-core machine; bench/sampler.py). For the duration of a
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


def _compiled(fn):
    """fn compiled whole (fullgraph, static shapes); on CUDA also replayed as a CUDA graph."""
    if fn not in _COMPILED:
        mode = "reduce-overhead" if torch.cuda.is_available() else None
        _COMPILED[fn] = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)
    return _COMPILED[fn]


def _compile_error(e: Exception) -> bool:
    """e is torch.compile refusing the step (the recompile limit's error is not a TorchDynamoException)."""
    exc = torch._dynamo.exc
    return isinstance(e, (exc.TorchDynamoException, exc.FailOnRecompileLimitHit))


def resolve_path(path: str, device: torch.device) -> str:
    from psyche.config import ConfigError

    if path not in PATHS:
        raise ValueError(f"sampler path must be one of {PATHS}, got {path!r}")
    if path == "auto":
        path = os.environ.get("PSYCHE_SAMPLER", "auto")
        if path not in PATHS:
            raise ConfigError(f"PSYCHE_SAMPLER={path!r}: must be one of {', '.join(PATHS)}")
    if path == "auto":
        return "compiled" if device.type == "cuda" else "eager"
    return path


@torch.no_grad()
def generate(model, prompts: list[list[int]], n: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, stop_token_ids=None, seed: int = 0,
             pad_id: int = 0, seeds: torch.Tensor | None = None, compact_below: float = 0.75,
             on_token=None, row_max_tokens: torch.Tensor | None = None, should_end=None,
             path: str = "auto") -> Rollout:
    """Sample n completions for each prompt (lists of token ids, any lengths).

    stop_token_ids: a row ends when it emits any of them (the stop token is kept in the completion).
    seeds: optional (N,) int64 per-row seeds overriding the ones derived from `seed`.
    compact_below: when fewer than this fraction of the cache's rows are still running, finished rows are
        dropped from the cache so they stop costing compute (static path: rebucketed; 0 never).
    on_token: optional callback(step, row_ids (B,), tokens (B,)) for each sampling step, in order (streaming):
        after the step on the eager path, at the next host sync (up to STOP_CHECK_EVERY steps later, CPU
        tensors) on the static path.
    row_max_tokens: optional (N,) per-row limits (<= max_new_tokens): a row ends after that many tokens.
    should_end: optional callback(row_ids (B,)) -> (B,) bool: rows to end now (a server's cancelled requests),
        asked before each sampling step (eager) or at each host sync (static). A row ended by a limit or by
        should_end is not `finished`.
    path: "auto" | "eager" | "static" | "compiled" (see the module docstring).
    """
    with cpu_head_layout(model):
        return _generate(model, prompts, n, max_new_tokens, temperature, top_p, top_k, min_p, stop_token_ids,
                         seed, pad_id, seeds, compact_below, on_token, row_max_tokens, should_end, path)


def _generate(model, prompts, n, max_new_tokens, temperature, top_p, top_k, min_p, stop_token_ids, seed, pad_id,
              seeds, compact_below, on_token, row_max_tokens, should_end, path) -> Rollout:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device = model.lm_head.weight.device
    P, N = len(prompts), len(prompts) * n
    stop = torch.tensor(sorted(set(stop_token_ids or [])), dtype=torch.long, device=device)
    seeds = row_seeds(seed, N, device) if seeds is None else seeds.to(device)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings ({model.config.max_position_embeddings})")

    path = resolve_path(path, device)
    small = KVCache.for_model(model, P, longest)
    logits = prefill(model, small, prompts)  # (P, V)
    if path != "eager":
        return _decode_static(model, small, logits, P, n, max_new_tokens, temperature, top_p, top_k, min_p, stop,
                              seeds, pad_id, row_max_tokens, on_token, should_end, compact_below,
                              compiled=path == "compiled")
    logits = logits.repeat_interleave(n, dim=0)  # (N, V)
    cache = KVCache.for_model(model, N, longest + max_new_tokens)
    cache.fork_from(small, n)
    del small

    tokens, logprobs, lengths, finished, alive = _outputs(N, max_new_tokens, pad_id, device)
    rows = torch.arange(N, device=device)  # (B,) the completion each cache row belongs to; alive: rows generating
    for t in range(max_new_tokens):
        live = alive.nonzero().squeeze(-1)
        if should_end is not None:  # the caller's rows to end before this step (cancelled requests)
            alive[live[torch.as_tensor(should_end(rows[live]), dtype=torch.bool, device=device)]] = False
            live = alive.nonzero().squeeze(-1)
            if len(live) == 0:
                break
        r = rows[live]
        u = uniforms(seeds[r], t) if temperature > 0 else None  # greedy draws nothing
        tok, lp = sample(logits[live], u, temperature, top_k, top_p, min_p)
        tokens[r, t], logprobs[r, t], lengths[r] = tok, lp, t + 1
        if on_token is not None:
            on_token(t, r, tok)
        if len(stop):
            done = torch.isin(tok, stop)
            finished[r] = done
            alive[live[done]] = False
        if row_max_tokens is not None:
            alive[live[row_max_tokens.to(device)[r] <= t + 1]] = False
        n_alive = int(alive.sum())
        if t == max_new_tokens - 1 or n_alive == 0:
            break
        step_tok = torch.full_like(rows, pad_id)
        step_tok[live] = tok
        if n_alive < compact_below * len(rows):  # drop finished rows: they stop costing compute
            keep = alive.nonzero().squeeze(-1)
            cache.keep(keep)
            rows, alive, step_tok = rows[keep], alive[keep], step_tok[keep]
        # finished rows not yet compacted away are fed a pad token; their outputs are never read
        logits = decode_one_token(model, cache, step_tok)
    return _rollout(tokens, logprobs, lengths, finished, P, n, pad_id)


def _outputs(N: int, max_new_tokens: int, pad_id: int, device):
    """A decode's output buffers: tokens (N, L) = pad, logprobs (N, L) = 0, lengths (N,) = 0, finished (N,) =
    False, alive (N,) = True."""
    return (torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device),
            torch.zeros(N, max_new_tokens, dtype=torch.float32, device=device),
            torch.zeros(N, dtype=torch.long, device=device), torch.zeros(N, dtype=torch.bool, device=device),
            torch.ones(N, dtype=torch.bool, device=device))


def _rollout(tokens, logprobs, lengths, finished, P: int, n: int, pad_id: int) -> Rollout:
    """The (N, max_new_tokens) outputs of a decode, cut to the longest completion and masked past each end."""
    L, device = int(lengths.max()), tokens.device
    mask = torch.arange(tokens.shape[1], device=device)[None, :] < lengths[:, None]
    return Rollout(tokens=tokens[:, :L].masked_fill(~mask[:, :L], pad_id), logprobs=(logprobs * mask)[:, :L],
                   mask=mask[:, :L], lengths=lengths, finished=finished,
                   prompt_index=torch.arange(P, device=device).repeat_interleave(n))


class _Slots:
    """The device state of a static decode over B rows: a StaticKVCache of S slots and the per-row buffers that
    static_step updates in place (room for L new tokens, Z stop ids). Sets are pooled by shape and reused,
    so a compiled step sees the same addresses call after call (a CUDA graph replays on the addresses it
    recorded; they are marked static for torch.compile). A set is used by one decode at a time."""

    def __init__(self, model, B: int, S: int, L: int, Z: int):
        p = model.lm_head.weight
        self.cache = StaticKVCache.for_model(model, B, S)
        new = functools.partial(torch.zeros, device=p.device)
        self.tok, self.seeds, self.lengths, self.limit = (new(B, dtype=torch.long) for _ in range(4))
        self.alive, self.finished = new(B, dtype=torch.bool), new(B, dtype=torch.bool)
        self.tokens, self.logprobs = new(B, L, dtype=torch.long), new(B, L, dtype=torch.float32)
        self.stop, self.t = new(Z, dtype=torch.long), new((), dtype=torch.long)
        for x in self._all():
            torch._dynamo.mark_static_address(x)
        self.busy = False

    def _all(self):
        return (self.cache.k, self.cache.v, self.cache.lengths, *self.args())

    def args(self):
        """static_step's tensor arguments after the cache, in order."""
        return (self.tok, self.t, self.seeds, self.alive, self.lengths, self.finished, self.tokens, self.logprobs,
                self.stop, self.limit)

    @property
    def batch(self) -> int:
        return self.tok.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self._all())

    def take(self, src: "_Slots", idx: torch.Tensor, n: int):
        """Become src's rows idx (B,): the first n are real, the rest pads (copies that are not alive)."""
        for d, s in ((self.cache.k, src.cache.k), (self.cache.v, src.cache.v)):
            torch.index_select(s, 1, idx, out=d)  # (layers, B, heads, S, D)
        for d, s in zip((self.cache.lengths, *self.args()), (src.cache.lengths, *src.args())):
            if d is self.t or d is self.stop:
                d.copy_(s)
            else:
                torch.index_select(s, 0, idx, out=d)  # per-row buffers: (B,) or (B, L)
        self.alive[n:] = False


_POOL: dict[tuple, list[_Slots]] = {}


def _acquire(model, B: int, S: int, L: int, Z: int) -> _Slots:
    p, c = model.lm_head.weight, model.config
    key = (p.device, p.dtype, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, B, S, L, Z)
    slots = next((x for x in _POOL.get(key, []) if not x.busy), None)
    if slots is None:
        slots = _Slots(model, B, S, L, Z)
        _POOL.setdefault(key, []).append(slots)
    else:  # most recently used last
        _POOL[key].remove(slots)
        _POOL[key].append(slots)
        _POOL[key] = _POOL.pop(key)
    slots.busy = True
    for x in slots._all():
        x.zero_()
    return slots


def _trim_pool():
    """Free idle buffer sets, least recently used first, beyond POOL_MAX sets or POOL_BYTES bytes."""
    idle = [(k, x) for k, xs in _POOL.items() for x in xs if not x.busy]
    total = sum(x.nbytes for _, x in idle)
    for k, x in idle:
        if len(idle) <= POOL_MAX and total <= POOL_BYTES:
            break
        _POOL[k].remove(x)
        if not _POOL[k]:
            del _POOL[k]
        idle = idle[1:]
        total -= x.nbytes


def release_buffers():
    """Free the static path's pooled buffers (KV caches included). The next static decode allocates anew."""
    _POOL.clear()


def _run_step(step, model, w: _Slots, args: dict):
    """One decode step with `step` (static_step or its compiled form) -> the step to use for the next ones.
    torch.compile's errors come while it traces or compiles, before any op runs, so nothing was written yet:
    e.g. an attention kernel dynamo cannot trace under fullgraph, or more shapes than RECOMPILE_LIMIT. Then
    the step runs uncompiled from here on (the same numbers), with a warning once per process."""
    if step is not static_step and w.tok.device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()  # a new replay: no output of the last one is still read
    try:
        step(model, w.cache, *w.args(), **args)
        return step
    except Exception as e:
        if step is static_step or not _compile_error(e):
            raise
        refused = e
    if static_step not in _NOT_COMPILABLE:
        import warnings

        warnings.warn(f"sampler: torch.compile cannot take the decode step ({type(refused).__name__}: "
                      f"{str(refused).splitlines()[0][:200]}); running it uncompiled", stacklevel=4)
    _NOT_COMPILABLE[static_step] = refused
    static_step(model, w.cache, *w.args(), **args)
    return static_step


def _decode_static(model, small, logits, P, n, max_new_tokens, temperature, top_p, top_k, min_p, stop, seeds,
                   pad_id, row_max_tokens, on_token, should_end, compact_below, compiled: bool) -> Rollout:
    """The static path of `generate` after the prefill (small: the prompts' cache, logits (P, V) their last
    positions): the N = P * n rows padded to a batch B on the ladder, over a StaticKVCache whose length is on
    the ladder from CACHE_MIN, one static_step per token. Every STOP_CHECK_EVERY tokens the host syncs once to
    stream the tokens since the last check (on_token), end the rows should_end names, stop if no row is left,
    and rebucket: when at most half the batch is still running (and fewer than compact_below of it), the
    running rows move to a batch half the size or less (on the ladder, >= REBUCKET_MIN)."""
    N, device = P * n, logits.device
    S = min(ladder(small.max_len + max_new_tokens, CACHE_MIN), model.config.max_position_embeddings)
    model.model.rotary_emb.reserve(model.config.max_position_embeddings, device)  # a table that grew later would
    #                                                         change a compiled step's inputs (a recompile)
    L, Z = ladder(max_new_tokens, 16), ladder(max(len(stop), 1), 1)
    B = ladder(N, 1)
    w = _acquire(model, B, S, L, Z)
    src = (torch.arange(B, device=device) // n).clamp_(max=P - 1)  # each row's prompt (pads: the last one)
    for d, s in ((w.cache.k, small.k), (w.cache.v, small.v)):
        d[:, :, :, :small.max_len] = s.index_select(1, src)
    w.cache.lengths.copy_(small.lengths[src])
    del small
    w.seeds[:N] = seeds
    w.limit[:N] = max_new_tokens if row_max_tokens is None else \
        row_max_tokens.to(device, torch.long).clamp(max=max_new_tokens)
    w.alive[:N] = True
    w.stop.fill_(-1)
    w.stop[:len(stop)] = stop
    out_tokens, out_logprobs, out_lengths, out_finished, _ = _outputs(N, max_new_tokens, pad_id, device)
    rows = torch.arange(N)  # host: the completion of each of w's real rows (the first len(rows))
    args = dict(pad_id=pad_id, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    emitted = 0  # steps already streamed

    def write_back():
        r = rows.to(device)
        for dst, s in ((out_tokens, w.tokens), (out_logprobs, w.logprobs), (out_lengths, w.lengths),
                       (out_finished, w.finished)):
            dst[r] = s[:len(rows), :max_new_tokens] if s.dim() == 2 else s[:len(rows)]

    def check(t: int) -> bool:
        """The host's look at the decode before step t (one sync): stream, end, rebucket. False: all ended."""
        nonlocal w, rows, emitted
        k = len(rows)
        alive = w.alive[:k].cpu()
        if on_token is not None and t > emitted:
            toks, lens = w.tokens[:k, emitted:t].cpu(), w.lengths[:k].cpu()
            for s in range(emitted, t):
                got = lens > s
                if got.any():
                    on_token(s, rows[got], toks[got, s - emitted])
        emitted = t
        if should_end is not None and alive.any():
            live = alive.nonzero().squeeze(-1)
            end = live[torch.as_tensor(should_end(rows[live]), dtype=torch.bool)]
            if len(end):
                alive[end] = False
                w.alive[end.to(device)] = False
        n_alive = int(alive.sum())
        if n_alive == 0:
            return False
        B2 = max(ladder(n_alive, 1), REBUCKET_MIN)
        if B2 <= w.batch // 2 and n_alive < compact_below * w.batch:
            write_back()
            keep = alive.nonzero().squeeze(-1)
            idx = torch.cat([keep, keep[:1].expand(B2 - n_alive)]).to(device)
            w2 = _acquire(model, B2, S, L, Z)
            w2.take(w, idx, n_alive)
            w.busy = False
            w, rows = w2, rows[keep]
        return True

    step = _compiled(static_step) if compiled and static_step not in _NOT_COMPILABLE else static_step
    try:
        if should_end is not None:
            check(0)
        record_step(logits[src], w.tok, w.t, *w.args()[2:], **args)
        t = 1
        with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)):
            while t < max_new_tokens:
                if t % STOP_CHECK_EVERY == 0 and not check(t):
                    break
                step = _run_step(step, model, w, args)
                t += 1
        if on_token is not None:
            check(t)  # stream the last steps
        write_back()
    finally:
        w.busy = False
        _trim_pool()
    return _rollout(out_tokens, out_logprobs, out_lengths, out_finished, P, n, pad_id)


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[list[int]], *, batch_size: int = 64, max_new_tokens: int = 256,
                   temperature: float = 0.0, seed: int = 0, top_p: float = 1.0, top_k: int = 0, seeds=None,
                   log=None) -> list[str]:
    """One decoded reply per prompt (special tokens dropped), in prompt order: prompts go in batches of similar
    length, row i sampled with seed `seeds[i]` (default row_seeds(seed, len(prompts))[i]) whatever batch it
    lands in, so the replies do not depend on the batch size. log(line): told about each batch.
    The one "prompts -> seeded rows -> generate -> texts" helper (evaluation, the demo, the task's grading);
    GRPO calls `generate` itself because it keeps the Rollout's log-probs, and chat and serve stream tokens."""
    seeds = row_seeds(seed, len(prompts)) if seeds is None else seeds
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    was_training = model.training
    model.eval()
    n_batches = -(-len(order) // batch_size)
    for b, s in enumerate(range(0, len(order), batch_size)):
        idx = order[s:s + batch_size]
        r = generate(model, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=temperature,
                     top_p=top_p, top_k=top_k, stop_token_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                     seeds=seeds[idx])
        for j, i in enumerate(idx):
            out[i] = tokenizer.decode(r.tokens[j, : r.lengths[j]].tolist(), skip_special_tokens=True)
        if log is not None:
            log(f"batch {b + 1}/{n_batches}: {len(idx)} prompts of up to {len(prompts[idx[-1]])} tokens")
    model.train(was_training)
    return out
