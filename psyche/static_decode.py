"""The static decode path: `psyche.decode.decode_step` over fixed shapes, so it can be replayed as a CUDA graph
(the default on CUDA) or compiled.

The N rows of a `generate` call (psyche/sampler.py) are padded to a batch B on a ladder of a few sizes (1, 2, 4, 8, 12, 16, 24,
32, ...), over a StaticKVCache of S slots seen whole (S on a ladder too), with room for L new tokens and Z stop
ids (both on ladders). Each (B, S, L, Z) is one shape of the step, and its buffers are pooled and reused across
calls (`Slots`), so a step recorded on them replays on the same addresses:
- path "graph" (`GraphStep`): the step captured once per buffer set and sampling setting with
  torch.cuda.CUDAGraph, after a warm-up on a side stream (Triton kernels autotune there, not during capture),
  every graph in one shared memory pool, and dropped with the buffers it recorded. No compile: a new shape
  costs one capture. On the CPU there is nothing to capture: the same warm-up, restore and calls run
  eagerly, so the path's logic is tested without a GPU.
- path "compiled": `torch.compile` of the step (fullgraph, static shapes; CUDA graphs on CUDA), one compile
  per new shape.
On every static path the host looks at the decode every STOP_CHECK_EVERY tokens (psyche.decode.Decoder.check):
once at most half the batch still runs, the running rows move to a batch half the size or less (rebucketing,
never below REBUCKET_MIN rows).
"""

from __future__ import annotations

import warnings

import torch

from psyche.kv_cache import StaticKVCache
from psyche.decode import Decoder, DecodeState, Job, decode_step

STOP_CHECK_EVERY = 8  # tokens between the host's checks (one sync each): have all rows ended, which rows to
#                       stream, cancel or drop
CACHE_MIN = 128  # cache lengths are 2^k or 1.5 * 2^k from this (at most a third of the slots wasted), so calls
#                  share a few compiled steps (each new shape compiles once)
REBUCKET_MIN = 8  # the batch is never rebucketed below this many rows (a decode step of 8 rows costs about what
#                   one of 1 does on a GPU: the weights are read once either way)
RECOMPILE_LIMIT = 64  # shapes a compiled decode step may take in one process (torch's default, 8, is too few for
#                       batch sizes x cache lengths; under fullgraph, running past it is an error)
POOL_MAX = 8  # idle buffer sets kept for reuse (a CUDA graph replays on the addresses it recorded),
POOL_BYTES = 4 << 30  # and at most this many bytes of them: a larger KV cache is freed after its decode (GRPO's
#                       update then has the memory; the next decode allocates it again and re-records its graph)


def ladder(n: int, start: int) -> int:
    """The smallest size >= n on the ladder start, ..., 2^k, 1.5 * 2^k, 2^(k+1), ... (doubling below 8)."""
    s = start
    while s < n:
        s = s * 2 if s < 8 else s * 3 // 2 if s & (s - 1) == 0 else s * 4 // 3
    return s


# ---- pooled buffers ----

GRAPH_WARMUP = 2  # decode steps run before a capture (autotuning, lazy initialisation), then undone


def weights_key(model) -> tuple:
    """What a captured step read besides its buffers: the addresses of the model's parameters, its buffers and
    its rotary cos/sin tables (a plain attribute, rebuilt when it grows or moves), the autocast state and which
    LoRA adapters are on. A graph replays only where these are the same (another model, the same one re-gathered
    elsewhere, or a rebuilt table gets a new capture); no model is kept alive by the key."""
    device = model.lm_head.weight.device.type
    tensors = [*model.parameters(), *model.buffers()]  # (under dist.unsharded: the gathered parameters)
    tensors += [t for m in model.modules() if getattr(m, "_table", None) is not None for t in m._table]
    return (tuple((t.to_local() if hasattr(t, "to_local") else t).data_ptr() for t in tensors), torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device), tuple(m.lora_enabled for m in model.modules() if hasattr(m, "lora_enabled")))


class GraphStep:
    """`decode_step` on one buffer set with one sampling setting, captured as a CUDA graph on first use and
    replayed after (on the CPU: called). The warm-up steps before the capture write the state they advance
    (tokens, lengths, t, ...) and KV-cache slots past every row's length; the state is restored before the
    capture, and those slots are masked off and overwritten by the real steps. The model is an argument of
    each call, not kept: a graph replays on the weights' addresses (Slots.graph_step keys it by them)."""

    def __init__(self, slots: "Slots", params, pad_id: int):
        self.slots, self.params, self.pad_id, self.graph, self.captured = slots, params, pad_id, None, False

    def _step(self, model):
        decode_step(model, self.slots.cache, self.slots.state, self.params, self.pad_id)

    def _capture(self, model):
        s, cache = self.slots.state, self.slots.cache
        saved = [(x, x.clone()) for x in (*s.tensors(), cache.lengths)]
        on_cuda = cache.k.is_cuda
        if on_cuda:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP):
                    self._step(model)
            torch.cuda.current_stream().wait_stream(side)
        else:
            for _ in range(GRAPH_WARMUP):
                self._step(model)
        for x, copy in saved:
            x.copy_(copy)
        if on_cuda:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=_graph_pool()):
                self._step(model)
        self.captured = True

    def __call__(self, model):
        if not self.captured:
            self._capture(model)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step(model)


_GRAPH_POOL = []


def _graph_pool():
    """The one memory pool every captured graph allocates from."""
    if not _GRAPH_POOL:
        _GRAPH_POOL.append(torch.cuda.graph_pool_handle())
    return _GRAPH_POOL[0]


class Slots:
    """The device state of a static decode over B rows: a StaticKVCache of S slots and a DecodeState (room for L
    new tokens, Z stop ids). Pooled by shape and reused, so a compiled step sees the same addresses call after
    call (marked static for torch.compile). A set is used by one decode at a time."""

    def __init__(self, model, B: int, S: int, L: int, Z: int):
        device = model.lm_head.weight.device
        self.cache = StaticKVCache.for_model(model, B, S)
        self.state = DecodeState.empty(B, L, Z, 0, device)
        for x in self.tensors():
            torch._dynamo.mark_static_address(x)
        self.busy = False
        self.graphs: dict[tuple, GraphStep] = {}  # (sampling, pad id) -> the step captured on these buffers
        self.weights = None  # the weights_key the graphs were captured for

    def graph_step(self, weights: tuple, params, pad_id: int) -> GraphStep:
        """The step captured on these buffers for these weights (weights_key) and sampling; graphs captured for
        other weights are dropped."""
        if weights != self.weights:
            self.graphs.clear()
            self.weights = weights
        key = (params, pad_id)
        if key not in self.graphs:
            self.graphs[key] = GraphStep(self, params, pad_id)
        return self.graphs[key]

    def tensors(self):
        return [self.cache.k, self.cache.v, self.cache.lengths, *self.state.tensors()]

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.tensors())

    def take(self, src: "Slots", idx: torch.Tensor, n: int):
        """Become src's rows idx (B,): the first n are real, the rest pads (copies that are not alive)."""
        for d, s in ((self.cache.k, src.cache.k), (self.cache.v, src.cache.v)):
            torch.index_select(s, 1, idx, out=d)  # (layers, B, heads, S, D)
        torch.index_select(src.cache.lengths, 0, idx, out=self.cache.lengths)
        for name in self.state.per_row():
            torch.index_select(getattr(src.state, name), 0, idx, out=getattr(self.state, name))
        self.state.t.copy_(src.state.t)
        self.state.stop.copy_(src.state.stop)
        self.state.alive[n:] = False


_POOL: dict[tuple, list[Slots]] = {}


def _acquire(model, B: int, S: int, L: int, Z: int) -> Slots:
    p, c = model.lm_head.weight, model.config
    key = (p.device, p.dtype, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, B, S, L, Z)
    slots = next((x for x in _POOL.get(key, []) if not x.busy), None)
    if slots is None:
        slots = Slots(model, B, S, L, Z)
        _POOL.setdefault(key, []).append(slots)
    else:  # most recently used last
        _POOL[key].remove(slots)
        _POOL[key].append(slots)
        _POOL[key] = _POOL.pop(key)
    slots.busy = True
    for x in slots.tensors():
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


# ---- the compiled step ----

_COMPILED = {}
_NOT_COMPILABLE: dict = {}  # fn -> why torch.compile could not take it (warned once, then run uncompiled)


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


class StaticDecoder(Decoder):
    """The static path's host side: a step is `decode_step` on the pooled buffers (compiled when asked), the
    host looks every STOP_CHECK_EVERY tokens, and the batch shrinks by rebucketing."""

    every = STOP_CHECK_EVERY

    def __init__(self, model, slots: Slots, job: Job, mode: str, dims: tuple):
        super().__init__(model, slots.cache, slots.state, job)
        self.slots, self.dims, self.mode = slots, dims, mode  # dims: (S, L, Z) of every set this decode uses
        compiled = mode == "compiled" and decode_step not in _NOT_COMPILABLE
        self.fn = _compiled(decode_step) if compiled else decode_step
        self.weights = weights_key(model) if mode == "graph" else None
        self.graph = None  # the GraphStep of the current buffer set

    def step(self):
        if self.mode == "graph":
            if self.graph is None or self.graph.slots is not self.slots:
                self.graph = self.slots.graph_step(self.weights, self.job.params, self.job.pad_id)
            self.graph(self.model)
            return
        self._compiled_step()

    def _compiled_step(self):
        """One decode step with self.fn. torch.compile's errors come while it traces or compiles, before any op
        runs, so nothing was written yet: e.g. an attention kernel dynamo cannot trace under fullgraph, or more
        shapes than RECOMPILE_LIMIT. Then the step runs uncompiled from here on (the same numbers), with a
        warning once per process."""
        args = (self.model, self.cache, self.state, self.job.params, self.job.pad_id)
        if self.fn is not decode_step and self.state.tok.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # a new replay: no output of the last one is still read
        try:
            self.fn(*args)
            return
        except Exception as e:
            if self.fn is decode_step or not _compile_error(e):
                raise
            refused = e
        if decode_step not in _NOT_COMPILABLE:
            warnings.warn(f"sampler: torch.compile cannot take the decode step ({type(refused).__name__}: "
                          f"{str(refused).splitlines()[0][:200]}); running it uncompiled", stacklevel=4)
        _NOT_COMPILABLE[decode_step] = refused
        self.fn = decode_step
        decode_step(*args)

    def shrink(self, alive):
        """Rebucket: when at most half the batch still runs (and fewer than compact_below of it), the running rows
        move to a batch half the size or less (on the ladder, >= REBUCKET_MIN)."""
        n_alive, B = int(alive.sum()), self.state.batch
        B2 = max(ladder(n_alive, 1), REBUCKET_MIN)
        if B2 <= B // 2 and n_alive < self.job.compact_below * B:
            self.write_back()
            keep = alive.nonzero().squeeze(-1)
            idx = torch.cat([keep, keep[:1].expand(B2 - n_alive)]).to(self.state.tok.device)
            w2 = _acquire(self.model, B2, *self.dims)
            w2.take(self.slots, idx, n_alive)
            self.slots.busy = False
            self.slots, self.cache, self.state = w2, w2.cache, w2.state
            self.rows = self.rows[keep]


def decode_static(model, small, logits, job: Job, mode: str):
    """The static path of `generate` after the prefill (small: the prompts' cache, logits (P, V) their last
    positions): the N = P * n rows padded to a batch B on the ladder, over a StaticKVCache whose length is on
    the ladder from CACHE_MIN, one decode_step per token: plain ("static"), compiled ("compiled") or replayed
    from a captured graph ("graph")."""
    N, P, device = job.N, job.P, logits.device
    S = min(ladder(small.max_len + job.max_new_tokens, CACHE_MIN), model.config.max_position_embeddings)
    model.model.rotary_emb.reserve(model.config.max_position_embeddings, device)  # a table that grew later would
    #                                                         change a compiled step's inputs (a recompile)
    dims = (S, ladder(job.max_new_tokens, 16), ladder(max(len(job.stop), 1), 1))
    w = _acquire(model, ladder(N, 1), *dims)
    src = (torch.arange(w.state.batch, device=device) // job.n).clamp_(max=P - 1)  # each row's prompt (pads: last)
    for d, s in ((w.cache.k, small.k), (w.cache.v, small.v)):
        d[:, :, :, :small.max_len] = s.index_select(1, src)
    w.cache.lengths.copy_(small.lengths[src])
    del small
    s = w.state
    s.seeds[:N] = job.seeds
    s.limit[:N] = job.max_new_tokens if job.limits is None else job.limits
    s.alive[:N] = True
    s.stop.fill_(-1)
    s.stop[:len(job.stop)] = job.stop
    s.tokens.fill_(job.pad_id)
    dec = StaticDecoder(model, w, job, mode, dims)
    try:
        with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)):
            return dec.run(logits[src])
    finally:
        dec.slots.busy = False
        _trim_pool()

