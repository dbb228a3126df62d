"""The decode step and its bookkeeping, shared by every sampling path (psyche/sampler.py's `generate` is the
front door; psyche/static_decode.py the compiled path):

    def decode_step(model, cache, state, params, pad_id):
        logits = decode_one_token(model, cache, state.tok)   # feed each row's last token
        record(state, logits, params, pad_id)                # sample the next one and book-keep it, in place

`sample` draws one token per row by inverse CDF from a counter-based uniform (`uniforms`: hash(seed_r, t)), so
a row's samples do not depend on its batch mates. `record` is the one per-token bookkeeping (the sampled token
and its log-prob, lengths, stop tokens, per-row limits, a non-finite flag), all on the device. `Decoder` is the
host's side of a decode: a step per token and, every `every` tokens, one look (`check`, one sync) that streams
the tokens since the last look (on_token), ends the rows the caller cancels (should_end), stops when no row
runs, raises NonFiniteLogitsError if a log-prob was NaN/inf, and shrinks the batch once most rows have ended
(`EagerDecoder`: compaction of a growing KVCache, a look after every token).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from psyche.config import SamplingParams
from psyche.kv_cache import KVCache

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


class NonFiniteLogitsError(FloatingPointError):
    """The model's logits were NaN or infinite: its weights or its config.json are broken (a run that
    diverged, a corrupt export). Raised by `generate` at its next host check, so no reply is made of them."""


def _non_finite(step: int) -> NonFiniteLogitsError:
    return NonFiniteLogitsError(f"the model's logits are not finite (NaN or inf) by decode step {step}: its "
                                "weights or config.json are broken (e.g. a training run that diverged)")


GREEDY = SamplingParams(temperature=0.0)


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


def sample(logits, u, params: SamplingParams = SamplingParams()):
    """logits (B, V), u (B,) uniforms -> (tokens (B,), logprobs (B,) fp32); see the module docstring."""
    p = params
    logits = logits.float()
    if p.temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / p.temperature, dim=-1)  # (B, V): the distribution we report
    probs = logp.exp()
    if p.top_k and p.top_k < probs.shape[-1]:
        kth = probs.topk(p.top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs >= kth, probs, 0.0)
    if p.min_p > 0:
        probs = torch.where(probs >= p.min_p * probs.max(-1, keepdim=True).values, probs, 0.0)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        keep = before < p.top_p * sorted_p.sum(-1, keepdim=True)
        keep[:, :1] = True  # the most probable token always stays: top_p -> 0 is greedy, also where
        #                     top_p * mass rounds to 0 in fp32 (which would otherwise drop every token)
        sorted_p = torch.where(keep, sorted_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    cdf = probs.double().cumsum(-1)  # (B, V)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    tok = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


# ---- the decode step ----

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


@dataclass
class DecodeState:
    """A decode's per-row state on the device, B rows (cache rows), room for L new tokens and Z stop ids. Every
    field is updated in place (`record`), so a compiled step or a CUDA graph sees the same tensors each step."""

    tok: torch.Tensor  # (B,) each row's last token: the next step's input
    t: torch.Tensor  # () the step
    seeds: torch.Tensor  # (B,) each row's sampling seed
    alive: torch.Tensor  # (B,) bool: still generating
    lengths: torch.Tensor  # (B,) tokens recorded
    finished: torch.Tensor  # (B,) bool: ended on a stop token
    limit: torch.Tensor  # (B,) each row's token budget
    bad: torch.Tensor  # (B,) bool: a log-prob was NaN or inf (read at the host's checks)
    tokens: torch.Tensor  # (B, L) the sampled tokens (pad after a row's end)
    logprobs: torch.Tensor  # (B, L) their log-probs (0 after the end)
    stop: torch.Tensor  # (Z,) stop ids (-1 pads)

    @classmethod
    def empty(cls, B: int, L: int, Z: int, pad_id: int, device) -> "DecodeState":
        z = lambda *shape, dtype=torch.long: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        return cls(tok=z(B), t=z(), seeds=z(B), alive=z(B, dtype=torch.bool), lengths=z(B),
                   finished=z(B, dtype=torch.bool), limit=z(B), bad=z(B, dtype=torch.bool),
                   tokens=torch.full((B, L), pad_id, dtype=torch.long, device=device),
                   logprobs=z(B, L, dtype=torch.float32), stop=torch.full((Z,), -1, dtype=torch.long, device=device))

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    @property
    def batch(self) -> int:
        return self.tok.shape[0]

    def per_row(self) -> list[str]:
        """The fields with one entry per row (all but t and stop)."""
        return [f.name for f in fields(self) if f.name not in ("t", "stop")]


def record(s: DecodeState, logits: torch.Tensor, params: SamplingParams, pad_id: int):
    """The per-token bookkeeping of every path, on the device, in place: sample step s.t's token of each row
    from `logits` (B, V), record it and its log-prob for the rows still alive, end the rows that drew a stop
    token or reached their limit, flag non-finite log-probs, and advance s.t. A row that has ended still
    samples (the batch is fixed) but nothing of it is recorded."""
    u = uniforms(s.seeds, s.t) if params.temperature > 0 else None  # greedy draws nothing
    new, lp = sample(logits, u, params)
    s.bad.logical_or_(s.alive & ~torch.isfinite(lp))  # a NaN/inf logit makes the row's log-prob non-finite
    col = s.t.view(1)
    s.tokens.index_copy_(1, col, torch.where(s.alive, new, pad_id)[:, None])
    s.logprobs.index_copy_(1, col, torch.where(s.alive, lp, 0.0)[:, None])
    s.lengths.add_(s.alive.long())
    hit = s.alive & torch.isin(new, s.stop)
    s.finished.logical_or_(hit)
    s.alive.logical_and_(~hit & (s.lengths < s.limit))
    s.tok.copy_(new)
    s.t.add_(1)


def decode_step(model, cache: KVCache, s: DecodeState, params: SamplingParams, pad_id: int):
    """One token of every row: feed each row's last token, sample the next one, book-keep it. Returns nothing
    and touches only `cache` and `s`, in place: the static path compiles (and on CUDA replays) exactly this."""
    record(s, decode_one_token(model, cache, s.tok), params, pad_id)


# ---- the host's side of a decode ----

@dataclass
class Job:
    """One `generate` call, as the decoders see it."""

    P: int  # prompts
    n: int  # completions per prompt
    max_new_tokens: int
    params: SamplingParams
    pad_id: int
    stop: torch.Tensor  # (S,) stop ids
    seeds: torch.Tensor  # (N,)
    limits: torch.Tensor | None  # (N,) per-row budgets, or None
    on_token: object = None
    should_end: object = None
    compact_below: float = 0.75

    @property
    def N(self) -> int:
        return self.P * self.n


class Decoder:
    """The host's side of a decode over the rows of `state` and `cache`: a `step` per token, and every `every`
    tokens a `check` (one sync). Subclasses say how a step runs and how the batch shrinks."""

    every = 1

    def __init__(self, model, cache, state: DecodeState, job: Job):
        self.model, self.cache, self.state, self.job = model, cache, state, job
        N, L, device = job.N, job.max_new_tokens, state.tok.device
        self.out = DecodeState.empty(N, L, 1, job.pad_id, device)  # the N completions' results
        self.rows = torch.arange(N)  # host: the completion of each of state's real rows (the first len(rows))
        self.emitted = 0  # steps already streamed

    def step(self):
        decode_step(self.model, self.cache, self.state, self.job.params, self.job.pad_id)

    def shrink(self, alive: torch.Tensor) -> None:
        """Make the batch smaller once few rows run (or leave it): alive (k,) bool over the real rows."""

    def run(self, first_logits: torch.Tensor) -> Rollout:
        """Decode from the prompts' last logits (one row of `first_logits` per state row)."""
        job = self.job
        t = 0  # rows cancelled before their first token (a server's) end now; the batch stays as first_logits'
        if job.should_end is None or self.check(0, shrink=False):
            record(self.state, first_logits, job.params, job.pad_id)
            t = 1
            while t < job.max_new_tokens:
                if t % self.every == 0 and not self.check(t):
                    break
                self.step()
                t += 1
        self.check(t, final=True)
        self.write_back()
        o = self.out
        return _rollout(o.tokens, o.logprobs, o.lengths, o.finished, job.P, job.n, job.pad_id)

    def check(self, t: int, final: bool = False, shrink: bool = True) -> bool:
        """The host's look at the decode before step t (one sync): non-finite log-probs, streaming, cancelled
        rows, and (not final) whether any row runs and (shrink) whether to shrink the batch. False: all rows
        ended."""
        s, job, k = self.state, self.job, len(self.rows)
        alive, bad = torch.stack([s.alive[:k], s.bad[:k]]).cpu()
        if bad.any():
            raise _non_finite(t - 1)
        if job.on_token is not None and t > self.emitted:
            toks, lens = s.tokens[:k, self.emitted:t].cpu(), s.lengths[:k].cpu()
            for step in range(self.emitted, t):
                got = lens > step
                if got.any():
                    job.on_token(step, self.rows[got], toks[got, step - self.emitted])
        self.emitted = t
        if final:
            return False
        if job.should_end is not None and alive.any():
            live = alive.nonzero().squeeze(-1)
            end = live[torch.as_tensor(job.should_end(self.rows[live]), dtype=torch.bool)]
            if len(end):
                alive[end] = False
                s.alive[end.to(s.alive.device)] = False
        if not alive.any():
            return False
        if shrink:
            self.shrink(alive)
        return True

    def write_back(self):
        """Copy the real rows' results into the completions' outputs."""
        s, o, r = self.state, self.out, self.rows.to(self.out.tok.device)
        L = o.tokens.shape[1]
        o.tokens[r], o.logprobs[r] = s.tokens[:len(r), :L], s.logprobs[:len(r), :L]
        o.lengths[r], o.finished[r] = s.lengths[:len(r)], s.finished[:len(r)]


class EagerDecoder(Decoder):
    """The reference path: the cache's visible length grows, the host looks after every token, and once fewer
    than compact_below of the rows run, the finished rows leave the cache (they stop costing compute)."""

    def shrink(self, alive):
        if alive.sum() < self.job.compact_below * len(self.rows):
            self.write_back()
            keep = alive.nonzero().squeeze(-1)
            dev = keep.to(self.state.tok.device)
            self.cache.keep(dev)
            s = self.state
            for name in s.per_row():
                setattr(s, name, getattr(s, name)[dev])
            self.rows = self.rows[keep]


def _rollout(tokens, logprobs, lengths, finished, P: int, n: int, pad_id: int) -> Rollout:
    """The (N, max_new_tokens) outputs of a decode, cut to the longest completion and masked past each end."""
    L, device = int(lengths.max()), tokens.device
    mask = torch.arange(tokens.shape[1], device=device)[None, :] < lengths[:, None]
    return Rollout(tokens=tokens[:, :L].masked_fill(~mask[:, :L], pad_id), logprobs=(logprobs * mask)[:, :L],
                   mask=mask[:, :L], lengths=lengths, finished=finished,
                   prompt_index=torch.arange(P, device=device).repeat_interleave(n))
