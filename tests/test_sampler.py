"""KV-cache sampler: parity with transformers, cache vs recompute, reported log-probs, seeds, stops."""

import pytest
import torch

from helpers import hf_model, left_padded, psyche_from_hf, tiny_config
from psyche.config import SamplingError
from psyche.kv_cache import KVCache
from psyche.model import build_model
from psyche.sampler import SamplingParams, generate, row_seeds, sample, uniforms

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11], [40]]


@pytest.fixture(scope="module")
def pair():
    cfg = tiny_config(n_head=4, n_kv=2, vocab=96)
    hf = hf_model(cfg, seed=7)
    return hf, psyche_from_hf(hf, cfg)


def test_greedy_equals_transformers_ragged_batch(pair):
    hf, m = pair
    r = generate(m, PROMPTS, max_new_tokens=16, temperature=0)
    ids, att = left_padded(PROMPTS)  # transformers wants left padding for batched generation
    T = ids.shape[1]
    out = hf.generate(ids, attention_mask=att, max_new_tokens=16, do_sample=False, pad_token_id=0,
                      eos_token_id=None)[:, T:]
    assert torch.equal(out, r.tokens)
    for i, p in enumerate(PROMPTS):  # and each prompt alone
        one = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert one[0, len(p):].tolist() == r.tokens[i].tolist()


def test_cached_decode_equals_recompute(pair):
    _, m = pair
    cache = KVCache.for_model(m, len(PROMPTS), 40)
    from psyche.sampler import decode_one_token, prefill

    seqs = [list(p) for p in PROMPTS]
    with torch.no_grad():
        logits = prefill(m, cache, PROMPTS)
        for step in range(8):
            for i, s in enumerate(seqs):  # the same logits from a full forward without cache
                full = m(torch.tensor([s]))[0, -1]
                torch.testing.assert_close(logits[i], full, atol=1e-4, rtol=0, msg=f"step {step} row {i}")
            tok = torch.randint(0, 96, (len(seqs),), generator=torch.Generator().manual_seed(step))
            for i in range(len(seqs)):
                seqs[i].append(int(tok[i]))
            logits = decode_one_token(m, cache, tok)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("trunc", [{}, {"top_k": 20}, {"top_p": 0.9}, {"min_p": 0.05}])
def test_reported_logprobs_equal_recomputed(pair, temperature, trunc):
    _, m = pair
    r = generate(m, PROMPTS, n=2, max_new_tokens=10, temperature=temperature, stop_token_ids=[1, 2],
                 seed=3, **trunc)
    for i in range(len(r.lengths)):
        p = PROMPTS[int(r.prompt_index[i])]
        comp = r.tokens[i, : r.lengths[i]]
        seq = torch.tensor(p + comp.tolist())[None]
        with torch.no_grad():
            logp = torch.log_softmax(m(seq)[0].float() / temperature, -1)
        # the logit at position t predicts token t+1
        want = logp[len(p) - 1: len(p) - 1 + len(comp)].gather(-1, comp[:, None]).squeeze(-1)
        torch.testing.assert_close(r.logprobs[i, : r.lengths[i]], want, atol=1e-4, rtol=0)
        assert (r.logprobs[i, r.lengths[i]:] == 0).all()


def test_group_fork_equals_separate_runs(pair):
    _, m = pair
    G = 4
    seeds = row_seeds(11, G)
    grouped = generate(m, [PROMPTS[0]], n=G, max_new_tokens=12, temperature=1.0, seed=seeds, stop_token_ids=[1])
    for j in range(G):
        single = generate(m, [PROMPTS[0]], n=1, max_new_tokens=12, temperature=1.0, seed=seeds[j:j + 1],
                          stop_token_ids=[1])
        L = int(single.lengths[0])
        assert grouped.tokens[j, :L].tolist() == single.tokens[0, :L].tolist()
        torch.testing.assert_close(grouped.logprobs[j, :L], single.logprobs[0, :L], atol=1e-5, rtol=0)
    assert len({tuple(grouped.tokens[j].tolist()) for j in range(G)}) > 1, "group rows must differ"


def test_deterministic_and_independent_of_compaction(pair):
    _, m = pair
    kw = dict(n=3, max_new_tokens=15, temperature=1.3, stop_token_ids=[1, 2, 3, 4, 5, 6], seed=5)
    a = generate(m, PROMPTS, compact_below=0.0, **kw)  # never compact
    b = generate(m, PROMPTS, compact_below=1.01, **kw)  # compact as soon as one row ends
    c = generate(m, PROMPTS, **kw)
    assert a.finished.any() and (~a.finished).any()
    for x in (b, c):
        assert torch.equal(a.tokens, x.tokens) and torch.equal(a.lengths, x.lengths)
        torch.testing.assert_close(a.logprobs, x.logprobs, atol=1e-5, rtol=0)
    d = generate(m, PROMPTS, **{**kw, "seed": 6})
    assert not torch.equal(a.tokens, d.tokens)


def test_stop_token_kept_and_pad_equal_to_stop():
    cfg = tiny_config(vocab=32)
    m = build_model(cfg, seed=2).eval()
    stop = 7
    r = generate(m, [[1, 2, 3]], n=16, max_new_tokens=30, temperature=1.5, stop_token_ids=[stop], pad_id=stop,
                 seed=0)
    assert r.finished.any(), "with vocab 32 and 30 steps some row must hit the stop id"
    for i in range(16):
        L = int(r.lengths[i])
        assert r.mask[i, :L].all() and not r.mask[i, L:].any()
        if r.finished[i]:
            assert r.tokens[i, L - 1] == stop and stop not in r.tokens[i, : L - 1].tolist()
            assert r.logprobs[i, L - 1] < 0  # the stop token carries its log-prob (and so its gradient)
        else:
            assert L == 30 and stop not in r.tokens[i].tolist()


def test_sample_frequencies_match_distribution():
    """Inverse-CDF sampling with hashed uniforms draws from softmax(logits / T)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).expand(20000, 5)
    u = uniforms(row_seeds(0, 20000), 0)
    tok, lp = sample(logits, u, SamplingParams(temperature=0.8))
    freq = torch.bincount(tok, minlength=5).double() / 20000
    want = torch.softmax(logits[0] / 0.8, -1).double()
    assert (freq - want).abs().max() < 0.015
    torch.testing.assert_close(lp, torch.log_softmax(logits / 0.8, -1).gather(-1, tok[:, None]).squeeze(-1))


def test_truncation_restricts_support():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).expand(4000, 5)
    u = uniforms(row_seeds(1, 4000), 0)
    assert set(sample(logits, u, SamplingParams(top_k=2))[0].tolist()) == {0, 1}
    p = torch.softmax(logits[0], -1)  # 0.636, 0.234, 0.086, ...: top_p 0.8 keeps the first two
    assert set(sample(logits, u, SamplingParams(top_p=0.8))[0].tolist()) == {0, 1}
    assert set(sample(logits, u, SamplingParams(min_p=0.3))[0].tolist()) == {0, 1}  # 0.086 / 0.636 < 0.3
    assert p[1] / p[0] > 0.3
    assert torch.equal(sample(logits, u, SamplingParams(temperature=0))[0], torch.zeros(4000, dtype=torch.long))


def test_a_vanishing_top_p_is_greedy():
    """top_p always keeps the most probable token: 1e-50 (0 in fp32: top_p * mass once dropped every token, and the
    last vocabulary id came out) gives the argmax, with the untruncated log-prob, as does any small top_p."""
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 3
    u = uniforms(row_seeds(2, 64), 0)
    for top_p in (1e-50, 1e-7):
        tok, lp = sample(logits, u, SamplingParams(top_p=top_p))
        assert torch.equal(tok, logits.argmax(-1)), top_p
        torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1))
    m = build_model(tiny_config(vocab=40), seed=1).eval()
    kw = dict(n=2, max_new_tokens=12)
    _same_rollout(generate(m, RAGGED, top_p=1e-50, path="eager", **kw),
                  generate(m, RAGGED, temperature=0.0, path="eager", **kw))


@pytest.mark.parametrize("field,value,match", [
    ("temperature", 1e-6, "temperature must be 0 .greedy. or at least 1e-05"),  # logits / 1e-38 overflow to inf
    ("temperature", -0.5, "temperature must be"),
    ("temperature", float("nan"), "temperature must be"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
    ("top_k", -1, "top_k must be >= 0"),
    ("min_p", 1.5, r"min_p must be in \[0, 1\]"),
])
def test_sampling_params_refuse_unusable_values(field, value, match):
    with pytest.raises(SamplingError, match=match) as e:
        SamplingParams(**{field: value})
    assert e.value.key == field and "\n" not in str(e.value)


def test_the_smallest_temperature_samples_finite_log_probs():
    """At MIN_TEMPERATURE (the smallest accepted above 0) logits / temperature stay finite: a sampled token, not
    a non-finite-logits error; greedy within rounding."""
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(1)) * 30
    tok, lp = sample(logits, uniforms(row_seeds(3, 64), 0), SamplingParams(SamplingParams.MIN_TEMPERATURE))
    assert torch.isfinite(lp).all() and torch.equal(tok, logits.argmax(-1))


def test_errors(pair):
    _, m = pair
    with pytest.raises(ValueError, match="at least one token"):
        generate(m, [[1], []])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(m, [[1, 2]], max_new_tokens=10_000)


# ---- the static path (StaticKVCache + one static_step per token) against the eager reference ----

STATIC_CASES = [
    dict(temperature=0.0),
    dict(temperature=1.0, n=3, top_p=0.9, stop_token_ids=[5, 7]),
    dict(temperature=0.8, n=2, top_k=5, stop_token_ids=[3], row_max_tokens=torch.tensor([4, 9, 20, 20, 6, 6, 2, 30])),
]
RAGGED = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14]]


def _same_rollout(a, b):
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.finished, b.finished) and torch.equal(a.mask, b.mask)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)


@pytest.mark.parametrize("kw", STATIC_CASES, ids=["greedy", "groups-top_p-stops", "top_k-row_limits"])
def test_static_path_equals_eager(kw):
    m = build_model(tiny_config(vocab=40), seed=1).eval()
    _same_rollout(generate(m, RAGGED, max_new_tokens=30, path="static", **kw),
                  generate(m, RAGGED, max_new_tokens=30, path="eager", **kw))


def test_compiled_path_equals_eager_and_transformers(pair):
    """One compiled step (torch.compile, fullgraph, static shapes; ~15 s to compile on 2 cores): greedy
    tokens equal the eager path's and transformers', sampled tokens and log-probs the eager path's."""
    hf, ours = pair
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    greedy = generate(ours, prompts, max_new_tokens=12, temperature=0.0, path="compiled")
    _same_rollout(greedy, generate(ours, prompts, max_new_tokens=12, temperature=0.0, path="eager"))
    ids, att = left_padded(prompts)
    T = ids.shape[1]
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=att, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                           pad_token_id=0, eos_token_id=None)[:, T:]
    assert torch.equal(greedy.tokens, want)
    kw = dict(temperature=1.0, n=2, top_p=0.9, stop_token_ids=[5], max_new_tokens=12)
    _same_rollout(generate(ours, prompts, path="compiled", **kw), generate(ours, prompts, path="eager", **kw))


def test_path_setting(monkeypatch):
    from psyche.sampler import resolve_path

    cpu = torch.device("cpu")
    assert resolve_path("auto", cpu) == "eager" and resolve_path("auto", torch.device("cuda")) == "graph"
    monkeypatch.setenv("PSYCHE_SAMPLER", "static")
    assert resolve_path("auto", cpu) == "static" and resolve_path("eager", cpu) == "eager"
    monkeypatch.setenv("PSYCHE_SAMPLER", "fast")
    with pytest.raises(ValueError, match="PSYCHE_SAMPLER='fast'"):
        resolve_path("auto", cpu)
    m = build_model(tiny_config(vocab=40), seed=1).eval()
    seen = []  # a streaming call on the static path gets every step, in order
    monkeypatch.setenv("PSYCHE_SAMPLER", "static")
    r = generate(m, RAGGED, max_new_tokens=5, temperature=0.0, on_token=lambda t, rows, tok: seen.append(t))
    assert seen == list(range(5)) and r.tokens.shape == (4, 5)


def test_static_path_rebuckets_to_smaller_batches(monkeypatch):
    """15 rows run as a batch of 16 (one pad row); with the minimum lowered to 1, rows that end move the running
    ones to batches of half the size or less. The tokens, log-probs, lengths and stop flags stay the eager
    path's."""
    import psyche.static_decode as sampler

    monkeypatch.setattr(sampler, "REBUCKET_MIN", 1)
    batches, acquire = [], sampler._acquire
    monkeypatch.setattr(sampler, "_acquire", lambda model, B, *a: (batches.append(B), acquire(model, B, *a))[1])
    m = build_model(tiny_config(vocab=40), seed=1).eval()
    kw = dict(temperature=1.0, n=3, stop_token_ids=[5, 7, 11], max_new_tokens=40,
              row_max_tokens=torch.tensor([3, 9, 17, 40, 40] * 3))
    prompts = RAGGED + [[15, 16]]
    _same_rollout(generate(m, prompts, path="static", **kw), generate(m, prompts, path="eager", **kw))
    assert batches[0] == 16 and len(batches) >= 3, batches
    assert all(b2 <= b1 // 2 for b1, b2 in zip(batches, batches[1:])), batches
    batches.clear()
    _same_rollout(generate(m, prompts, path="static", compact_below=0.0, **kw),
                  generate(m, prompts, path="eager", **kw))
    assert batches == [16]  # compact_below=0: never rebucket


def test_static_path_streams_and_cancels_like_eager():
    """Streaming (on_token) and cancelling (should_end) on the static path, which hands them over every
    STOP_CHECK_EVERY tokens: the same (step, rows, tokens) events as the eager path's and the same rollout when
    a cancellation lands on a check (here: rows 1 and 6, once 8 steps have been streamed)."""
    import psyche.static_decode as sampler

    assert sampler.STOP_CHECK_EVERY == 8
    m = build_model(tiny_config(vocab=40), seed=1).eval()

    def run(path):
        seen = []

        def on_token(t, rows, toks):
            seen.append((t, rows.tolist(), toks.tolist()))

        def should_end(rows):
            return [bool(seen) and seen[-1][0] >= 7 and int(r) in (1, 6) for r in rows]

        r = generate(m, RAGGED, n=2, temperature=1.0, stop_token_ids=[5], max_new_tokens=30, on_token=on_token,
                     should_end=should_end, path=path)
        return r, seen

    (a, seen_a), (b, seen_b) = run("static"), run("eager")
    _same_rollout(a, b)
    assert seen_a == seen_b
    assert a.lengths[1] <= 8 and a.lengths[6] <= 8 and a.lengths.max() > 8
    assert [t for t, _, _ in seen_a] == list(range(int(a.lengths.max())))


def test_static_buffers_are_reused_across_calls(monkeypatch):
    """The static path's buffers (KV cache included) are pooled by shape: a second call of the same shapes
    decodes in the same memory (a CUDA graph replays there), with the same results; release_buffers frees them,
    and a decode frees what is beyond POOL_BYTES or POOL_MAX sets when it ends, least recently used first."""
    import psyche.static_decode as sampler

    monkeypatch.setattr(sampler, "_POOL", {})
    m = build_model(tiny_config(vocab=40), seed=1).eval()
    kw = dict(temperature=1.0, n=2, stop_token_ids=[5], max_new_tokens=20, path="static")
    first = generate(m, RAGGED, **kw)
    (slots,), = sampler._POOL.values()
    ptr = slots.cache.k.data_ptr()
    _same_rollout(generate(m, RAGGED, **kw), first)
    (again,), = sampler._POOL.values()
    assert again is slots and again.cache.k.data_ptr() == ptr and not again.busy
    sampler.release_buffers()
    assert sampler._POOL == {}
    monkeypatch.setattr(sampler, "POOL_BYTES", slots.nbytes - 1)  # too large to keep: freed after the decode
    _same_rollout(generate(m, RAGGED, **kw), first)
    assert sampler._POOL == {}
    monkeypatch.setattr(sampler, "POOL_BYTES", 1 << 30)
    monkeypatch.setattr(sampler, "POOL_MAX", 1)  # one set kept: the least recently used goes
    generate(m, RAGGED[:1], **kw)
    generate(m, RAGGED, **kw)
    (key,) = sampler._POOL
    assert key[5] == 8  # the batch of 4 prompts x 2 is the one kept


def test_cpu_head_layout_changes_the_layout_only(monkeypatch):
    """The decode-time column-major copy of a large lm_head (forced here on a tiny model) leaves the tokens,
    the log-probs and the model's own (tied) parameters as they were."""
    import psyche.sampler as sampler

    m = build_model(tiny_config(vocab=40), seed=1).eval()
    head = m.lm_head.weight
    kw = dict(max_new_tokens=12, temperature=1.0, n=2, stop_token_ids=[5])
    before = generate(m, RAGGED, **kw)
    monkeypatch.setattr(sampler, "HEAD_LAYOUT_MIN", 0)
    inside = []
    monkeypatch.setattr(sampler, "_generate", lambda model, *a: (inside.append(model.lm_head.weight.stride()),
                                                                  before)[1])
    generate(m, RAGGED, **kw)
    assert inside == [(1, head.shape[0])]  # column-major during the call
    assert m.lm_head.weight is head  # restored
    if m.config.tie_word_embeddings:
        assert m.lm_head.weight is m.model.embed_tokens.weight  # still tied
    monkeypatch.undo()
    monkeypatch.setattr(sampler, "HEAD_LAYOUT_MIN", 0)
    _same_rollout(generate(m, RAGGED, **kw), before)


def test_a_step_torch_compile_cannot_take_runs_uncompiled_with_a_warning(monkeypatch):
    """E.g. an attention kernel dynamo cannot trace under fullgraph: the decode continues uncompiled, warned
    once, with the same tokens as the eager path."""
    import torch._dynamo

    import psyche.sampler
    import psyche.static_decode as sampler

    def refuse(fn):
        def compiled(*a, **k):
            raise torch._dynamo.exc.Unsupported("a kernel dynamo cannot trace")
        return compiled

    monkeypatch.setattr(sampler, "_compiled", refuse)
    monkeypatch.setattr(sampler, "_NOT_COMPILABLE", {})
    m = build_model(tiny_config(vocab=40), seed=1).eval()
    kw = dict(max_new_tokens=10, temperature=1.0, n=2, stop_token_ids=[5])
    with pytest.warns(UserWarning, match="torch.compile cannot take the decode step"):
        got = generate(m, RAGGED, path="compiled", **kw)
    _same_rollout(got, generate(m, RAGGED, path="eager", **kw))
    assert psyche.sampler.decode_step in sampler._NOT_COMPILABLE  # later calls do not try again


@pytest.mark.slow
def test_compiled_path_rebuckets_and_streams_like_eager(monkeypatch):
    """The compiled static path (one compile per batch size, ~20 s in all on 2 cores) through rebucketing and
    streaming: the eager path's tokens, log-probs and streamed events."""
    import psyche.static_decode as sampler

    monkeypatch.setattr(sampler, "REBUCKET_MIN", 1)
    m = build_model(tiny_config(vocab=40), seed=1).eval()
    kw = dict(temperature=1.0, n=3, top_p=0.9, stop_token_ids=[5, 7, 11], max_new_tokens=40)

    def run(path):
        seen = []
        r = generate(m, RAGGED, path=path, on_token=lambda t, rows, tok: seen.append((t, rows.tolist(),
                                                                                     tok.tolist())), **kw)
        return r, seen

    (a, seen_a), (b, seen_b) = run("compiled"), run("eager")
    _same_rollout(a, b)
    assert seen_a == seen_b and a.lengths.min() < 20


@pytest.mark.slow
def test_compiled_step_takes_more_shapes_than_torchs_recompile_limit(monkeypatch):
    """Batch sizes x cache lengths give a compiled decode step more shapes than torch's recompile limit (8 by
    default); under fullgraph, passing it is an error, which would drop the step to uncompiled for the rest of
    the process. Inside a decode the limit is RECOMPILE_LIMIT: with torch's set to 1 here, two new shapes still
    compile (and with RECOMPILE_LIMIT at 1 as well, the second one is refused: the limit is what matters)."""
    import warnings

    import torch._dynamo

    import psyche.static_decode as sampler

    m = build_model(tiny_config(vocab=40), seed=1).eval()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    monkeypatch.setattr(sampler, "_NOT_COMPILABLE", {})
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="sampler: torch.compile cannot take")  # the fallback's
        for prompts in (RAGGED[:1], RAGGED[:2]):
            generate(m, prompts, max_new_tokens=10, temperature=0.0, path="compiled")
    assert not sampler._NOT_COMPILABLE
    monkeypatch.setattr(sampler, "RECOMPILE_LIMIT", 1)
    with pytest.warns(UserWarning, match="torch.compile cannot take the decode step"):
        generate(m, RAGGED[:3], max_new_tokens=10, temperature=0.0, path="compiled")
    torch._dynamo.reset()


@pytest.mark.parametrize("path", ["eager", "static"])
@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_non_finite_logits_are_an_error_and_nothing_is_streamed(path, where):
    """NaN in the weights makes every logit NaN from the first token (prefill) or, when a row's own KV cache
    entries turn NaN later (decode), from then on: generate raises NonFiniteLogitsError at its next host check,
    and no token sampled from such logits reaches on_token."""
    from psyche.sampler import NonFiniteLogitsError

    model = build_model(tiny_config(vocab=64, tied=False), seed=0).eval()  # untied: an embedding row is no logit
    prompts = [[1, 2, 3], [4, 5]]
    clean = generate(model, prompts, n=2, max_new_tokens=24, temperature=1.0, path=path)
    with torch.no_grad():
        if where == "prefill":
            model.model.norm.weight[0] = float("nan")
        else:  # an infinite embedding for tokens the clean run samples only late: NaN logits once one is fed
            late = set(clean.tokens[:, 12:].flatten().tolist()) - set(clean.tokens[:, :12].flatten().tolist()) \
                - {t for p in prompts for t in p}
            assert late
            for t in late:
                model.model.embed_tokens.weight[t] = float("inf")
    seen = []
    with pytest.raises(NonFiniteLogitsError, match="not finite"):
        generate(model, prompts, n=2, max_new_tokens=24, temperature=1.0, path=path,
                 on_token=lambda s, rows, toks: seen.extend(zip([s] * len(rows), rows.tolist(), toks.tolist())))
    if where == "prefill":
        assert seen == []
    else:  # what was streamed was sampled from finite logits: the clean run's tokens
        assert seen and all(clean.tokens[r, s] == tok for s, r, tok in seen)


def test_the_graph_path_equals_eager_through_stops_groups_top_p_rebucketing_streaming_and_cancelling(monkeypatch):
    """The graph path (CUDA graphs per buffer set and sampling setting; on the CPU the same warm-up, restore and
    plain calls): the eager path's tokens, log-probs and streamed events, one capture per (buffer set, sampling
    setting) however many steps, and the warm-up undone (it runs steps that must leave no trace)."""
    import psyche.static_decode as sd

    monkeypatch.setattr(sd, "REBUCKET_MIN", 1)
    monkeypatch.setattr(sd, "_POOL", {})
    captures = []
    real = sd.GraphStep._capture
    monkeypatch.setattr(sd.GraphStep, "_capture", lambda self, model: (captures.append(id(self)), real(self, model))[1])
    m = build_model(tiny_config(vocab=40), seed=1).eval()
    kw = dict(temperature=1.0, n=3, top_p=0.9, stop_token_ids=[5, 7, 11], max_new_tokens=40,
              row_max_tokens=torch.tensor([3, 9, 17, 40, 40] * 3)[:12])

    def run(path):
        seen = []

        def should_end(rows):
            return [bool(seen) and seen[-1][0] >= 15 and int(r) == 4 for r in rows]

        r = generate(m, RAGGED, path=path, should_end=should_end,
                     on_token=lambda t, rows, tok: seen.append((t, rows.tolist(), tok.tolist())), **kw)
        return r, seen

    (a, seen_a), (b, seen_b) = run("graph"), run("eager")
    _same_rollout(a, b)
    assert seen_a == seen_b and a.lengths[4] <= 16
    n_sets = sum(len(v) for v in sd._POOL.values())
    assert len(captures) == len(set(captures)) and 2 <= len(captures) <= n_sets  # one per set (rebucketed: >1)
    before = len(captures)
    again = generate(m, RAGGED, path="graph", **kw)  # the same shapes and settings: replayed, nothing captured
    assert len(captures) == before
    greedy = generate(m, RAGGED, path="graph", **{**kw, "temperature": 0.0})  # another setting: captured anew
    assert len(captures) > before
    _same_rollout(greedy, generate(m, RAGGED, path="eager", **{**kw, "temperature": 0.0}))
    _same_rollout(again, generate(m, RAGGED, path="eager", **kw))
    sd.release_buffers()
    assert sd._POOL == {}  # graphs live on their buffer sets: released with them


@pytest.mark.parametrize("path", ["eager", "static", "graph"])
def test_rows_cancelled_before_their_first_token_end_without_one(path):
    """A server may cancel requests before their first token: those rows end empty, the others decode as if
    alone (per-row seeds), on every path, also when enough rows end to shrink the batch at once; and when every
    row is cancelled the call returns empty completions."""
    m = build_model(tiny_config(vocab=40), seed=1).eval()
    kw = dict(n=16, max_new_tokens=12, temperature=1.0, path=path)
    full = generate(m, [[5, 6, 7]], **kw)
    r = generate(m, [[5, 6, 7]], should_end=lambda rows: (rows >= 4).tolist(), **kw)
    assert r.lengths[4:].eq(0).all() and torch.equal(r.lengths[:4], full.lengths[:4])
    L = r.tokens.shape[1]
    assert torch.equal(r.tokens[:4], full.tokens[:4, :L])  # (log-probs: a smaller batch rounds a little apart)
    assert torch.allclose(r.logprobs[:4], full.logprobs[:4, :L], atol=1e-5)
    none = generate(m, [[5, 6, 7]], should_end=lambda rows: [True] * len(rows), **{**kw, "n": 4})
    assert none.lengths.eq(0).all() and none.tokens.shape == (4, 0)


def test_the_graph_path_decodes_each_model_with_its_own_weights(monkeypatch):
    """Buffer sets are pooled by shape, and a graph replays on the addresses it recorded: a second model of the
    same shape (an evaluation of several checkpoints) must get its own capture, not the first model's step."""
    import psyche.static_decode as sd

    monkeypatch.setattr(sd, "_POOL", {})
    a, b = (build_model(tiny_config(vocab=40), seed=s).eval() for s in (1, 2))
    kw = dict(n=2, max_new_tokens=20, temperature=1.0)
    for m in (a, b, a):
        _same_rollout(generate(m, RAGGED, path="graph", **kw), generate(m, RAGGED, path="eager", **kw))
    slots = [x for xs in sd._POOL.values() for x in xs]
    assert slots and all(x.weights == sd.weights_key(a) and len(x.graphs) <= 1 for x in slots)


def test_a_rebuilt_rotary_table_changes_the_graph_key():
    """A captured step reads the rotary cos/sin tables by address, and they are a plain attribute (not a buffer)
    that is rebuilt when it grows or moves: the key a graph replays under must change with them."""
    import psyche.static_decode as sd

    m = build_model(tiny_config(vocab=40), seed=1).eval()
    rot, device = m.model.rotary_emb, m.lm_head.weight.device
    rot.reserve(m.config.max_position_embeddings, device)
    before, old = sd.weights_key(m), rot._table
    assert sd.weights_key(m) == before  # the same table: the same key
    rot.reserve(2 * m.config.max_position_embeddings, device)  # grows: new tensors (`old` keeps the first alive)
    assert rot._table is not old and sd.weights_key(m) != before
