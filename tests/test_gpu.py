"""Checks that need a GPU: `python -m pytest -m gpu tests/test_gpu.py` (deselected by default, see pytest.ini).

The device is $PSYCHE_TEST_DEVICE (default "cuda"); without CUDA the module is skipped. With
PSYCHE_TEST_DEVICE=cpu the device-independent parts run on CPU (the tests that need compiled Triton kernels
skip), which checks the tests themselves on a machine without a GPU. No test reads ../shared data or the
network. When $PSYCHE_GPU_REPORT names a file, every test appends the errors it measured to it (JSON lines),
so a passing run still says how close things were.

What is checked, and the tolerances (why each is what it is is stated at the test):
- psyche vs transformers' Qwen2ForCausalLM (sdpa), padded batch, hidden 256 / 4 layers / 8:2 heads / V 2048:
  fp32 logits max abs diff <= 1e-4 (logits: std ~0.3, max ~1.5); bf16: psyche's error against the fp32
  logits <= 1.5x transformers' own bf16 error + 2e-3 (relative Frobenius), and the two bf16 models within
  max abs 5e-2 of each other.
- the same psyche model with the Triton kernels vs PSYCHE_KERNELS=reference: fp32 within 1e-4 relative;
  bf16 logits, log-probs, entropy and every parameter gradient no less accurate than the reference against an
  fp32 run of the same weights (error <= 2x the reference's + 1e-2, and <= 0.1 outright).
- each kernel at Qwen2.5 shapes in bf16 against its reference and an fp32 computation of the same inputs:
  error <= 2x the reference's + a floor of a quarter bf16 ulp, and <= 2e-2 relative outright; token_logprobs'
  fp32 log-probs and entropies within 1e-3 of the fp32 computation.
- token_logprobs peak memory (forward + backward, V = 151,936) <= 1/4 of the naive (N, V) fp32 path.
- the sampler: greedy tokens equal transformers' generate (fp32, ragged batch; a difference is tolerated only
  at a near-tie, top-2 logit gap < 1e-4); its log-probs equal a plain forward's (fp32 1e-4; bf16 0.1).
- one SFT step and one GRPO update on the device: finite, and 1 vs 2 micro-batches give the same gradient
  (fp32, relative 1e-5); the SFT and GRPO loops end to end (train.py, tiny configs); a 1-process FSDP2 run
  (torchrun, nccl on CUDA / gloo on CPU) equals the unsharded model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from psyche import kernels
from helpers import hf_model, left_padded, psyche_from_hf, tiny_config
from psyche.config import OptimSection
from psyche.model_config import ModelConfig
from psyche.model import build_model

DEVICE = torch.device(os.environ.get("PSYCHE_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                       reason="no CUDA device (torch.cuda.is_available() is False); PSYCHE_TEST_DEVICE=cpu runs "
                              "the device-independent parts of these tests on CPU"),
]
needs_triton = pytest.mark.skipif(
    not (ON_CUDA and kernels.HAS_TRITON),
    reason="needs the compiled Triton kernels, i.e. a CUDA device and triton (on CPU the kernels only run under "
           "the interpreter: tests/test_kernels.py)")
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="measures CUDA memory (torch.cuda.max_memory_allocated)")


@pytest.fixture(autouse=True)
def _exact_fp32_and_default_kernels(monkeypatch):
    """fp32 matmuls in full precision (no TF32), and the default kernel dispatch unless a test sets one."""
    monkeypatch.delenv("PSYCHE_KERNELS", raising=False)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    if ON_CUDA:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------------ helpers


def _record(test: str, **numbers):
    """Append what a test measured to $PSYCHE_GPU_REPORT (JSON lines), if set."""
    path = os.environ.get("PSYCHE_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "device": str(DEVICE), **numbers}) + "\n")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius, in float64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def cpu_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dev_randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """randn on the device from a device generator (large tensors: no host round trip)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, device=DEVICE, generator=g) * scale).to(dtype)


def mid_config(tied: bool = False) -> ModelConfig:
    """A bit larger than tiny: head_dim 32, GQA 4:1, untied by default (as 7B; 0.5B is tied)."""
    return ModelConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=tied,
                       max_position_embeddings=512, torch_dtype="float32")


def _to(model):
    """A psyche model -> DEVICE, tied weights still tied."""
    model = model.to(DEVICE)
    model.tie_weights()
    return model


def _hf_cast(hf, dtype):
    """transformers model -> DEVICE in `dtype`, with rotary inv_freq kept in fp32 (as from_pretrained with a bf16
    dtype leaves it; Module.to(bf16) would round the frequencies and move every angle)."""
    inv = hf.model.rotary_emb.inv_freq.detach().clone()
    hf = hf.to(DEVICE, dtype)
    hf.model.rotary_emb.inv_freq = inv.to(DEVICE)
    return hf


def _right_padded(lengths, T, vocab, seed):
    ids = torch.randint(1, vocab, (len(lengths), T), generator=cpu_gen(seed))
    att = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, L in enumerate(lengths):
        att[i, :L] = 1
    return (ids * att).to(DEVICE), att.to(DEVICE)


def _subprocess_env():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PSYCHE_KERNELS", None)
    if not ON_CUDA:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the child picks cuda whenever it sees one
    return env


# --------------------------------------------------------------------------------------------- a. transformers parity


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_sdpa_padded_batch(tied):
    """Right-padded batch (lengths 64, 41, 23, 9), explicit positions, both models on the device with sdpa
    attention; only real positions are compared (right padding: no query row is fully masked in either).
    psyche uses its default kernel dispatch (Triton on CUDA).
    - fp32: max abs diff <= 1e-4. Logits have std ~0.3 and max ~1.5 here; the two differ only in the order
      of fp32 reductions (observed 0 on CPU, where both run the same ops).
    - bf16: both round differently along the way (psyche's kernels round once per op, transformers after every
      op), so each is compared with the fp32 logits: psyche's relative error <= 1.5x transformers' + 2e-3
      (on CPU both are ~0.9%), and the two bf16 models within max abs 5e-2 (~3x the bf16 error seen, 1.6e-2).
    """
    cfg = mid_config(tied=tied)
    hf32 = hf_model(cfg, seed=3)  # random biases and norm weights too
    try:
        hf32.set_attn_implementation("sdpa")
    except AttributeError:  # an older transformers
        hf32.config._attn_implementation = "sdpa"
    assert hf32.config._attn_implementation == "sdpa"
    ps32, ps16 = _to(psyche_from_hf(hf32, cfg)), _to(psyche_from_hf(hf32, cfg, torch.bfloat16))
    hf16 = _hf_cast(copy.deepcopy(hf32), torch.bfloat16)
    hf32 = hf32.to(DEVICE)
    T = 64
    ids, att = _right_padded([64, 41, 23, 9], T, cfg.vocab_size, seed=1)
    pos = torch.arange(T, device=DEVICE).expand(len(ids), T)
    real = att.bool()
    with torch.no_grad():
        out = {"ps32": ps32(ids, position_ids=pos, attention_mask=att),
               "hf32": hf32(input_ids=ids, position_ids=pos, attention_mask=att).logits,
               "ps16": ps16(ids, position_ids=pos, attention_mask=att),
               "hf16": hf16(input_ids=ids, position_ids=pos, attention_mask=att).logits}
    assert out["ps16"].dtype == torch.bfloat16 and out["hf16"].dtype == torch.bfloat16
    out = {k: v.float() for k, v in out.items()}
    assert torch.isfinite(out["ps32"]).all() and torch.isfinite(out["ps16"]).all(), "pad positions must stay finite"
    r = {k: v[real] for k, v in out.items()}
    fp32_diff = maxabs(r["ps32"], r["hf32"])
    e_ps, e_hf = rel(r["ps16"], r["hf32"]), rel(r["hf16"], r["hf32"])
    bf16_diff = maxabs(r["ps16"], r["hf16"])
    _record(f"a_transformers_parity[tied={tied}]", fp32_max_abs=fp32_diff, bf16_rel_err_psyche=e_ps,
            bf16_rel_err_transformers=e_hf, bf16_max_abs_psyche_vs_transformers=bf16_diff,
            logit_std=float(r["hf32"].std()), logit_max=float(r["hf32"].abs().max()))
    assert fp32_diff <= 1e-4, f"fp32 logits differ by {fp32_diff:.3g}"
    assert e_ps <= 1.5 * e_hf + 2e-3, f"bf16 relative error: psyche {e_ps:.3g}, transformers {e_hf:.3g}"
    assert bf16_diff <= 5e-2, f"bf16 logits differ by {bf16_diff:.3g} (max abs)"


# -------------------------------------------------------------------------------------- b. model: Triton vs reference


def _model_run(model, mode, monkeypatch, ids, att, targets, upstream):
    """Logits, per-token log-probs and entropy (the fused lm_head path) and every parameter gradient of a random
    projection of all three, with PSYCHE_KERNELS=mode."""
    monkeypatch.setenv("PSYCHE_KERNELS", mode)
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=att)
    logp, ent = model(ids, attention_mask=att, targets=targets, temperature=0.8)
    g_logits, g_lp, g_ent = upstream
    ((logits.float() * g_logits).sum() + (logp * g_lp).sum() + (ent * g_ent).sum()).backward()
    outs = {"logits": logits.detach().float(), "logp": logp.detach(), "entropy": ent.detach()}
    return outs, {n: p.grad.detach().float() for n, p in model.named_parameters()}


def _model_inputs(cfg, seed=0):
    B, T = 3, 48
    ids = torch.randint(1, cfg.vocab_size, (B, T), generator=cpu_gen(seed))
    att = torch.ones(B, T, dtype=torch.long)
    att[1, :7] = 0  # left padding
    att[2, :30] = 0
    ids = ids * att
    targets = torch.cat([ids[:, 1:], torch.full((B, 1), -1)], 1)
    targets[att == 0] = -1
    targets[0, :5] = -1  # "prompt" tokens carry no target
    g = cpu_gen(seed + 1)
    upstream = (torch.randn(B, T, cfg.vocab_size, generator=g) * 1e-2, torch.randn(B, T, generator=g),
                torch.randn(B, T, generator=g))
    return ids.to(DEVICE), att.to(DEVICE), targets.to(DEVICE), tuple(u.to(DEVICE) for u in upstream)


@needs_triton
def test_model_triton_kernels_match_reference(monkeypatch):
    """The mid model with the Triton kernels (PSYCHE_KERNELS=auto, the default on CUDA) vs the PyTorch
    references (PSYCHE_KERNELS=reference), forward and backward, on a left-padded batch.
    - fp32: every output and gradient within 1e-4 relative (same math, other reduction order).
    - bf16: each output and gradient is compared with an fp32 run of the same (bf16-valued) weights; the Triton
      path's relative error must be <= 2x the reference path's + 1e-2 and <= 0.1. (The kernels compute in fp32
      and round once; the references round after each op, so the Triton path is usually the more accurate.)
    """
    cfg = mid_config()
    ids, att, targets, upstream = _model_inputs(cfg)
    m32 = build_model(cfg, device=DEVICE, dtype=torch.float32, seed=0)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    truth = _model_run(copy.deepcopy(m16).float(), "reference", monkeypatch, ids, att, targets, upstream)
    report = {}
    # fp32
    ref = _model_run(m32, "reference", monkeypatch, ids, att, targets, upstream)
    tri = _model_run(m32, "auto", monkeypatch, ids, att, targets, upstream)
    worst32 = max((rel(tri[i][k], ref[i][k]), k) for i in (0, 1) for k in ref[i])
    report["fp32_worst_rel"] = worst32
    # bf16
    ref = _model_run(m16, "reference", monkeypatch, ids, att, targets, upstream)
    tri = _model_run(m16, "auto", monkeypatch, ids, att, targets, upstream)
    rows = []
    for i in (0, 1):
        assert tri[i].keys() == ref[i].keys() == truth[i].keys()
        for k in ref[i]:
            rows.append((k, rel(tri[i][k], truth[i][k]), rel(ref[i][k], truth[i][k]), rel(tri[i][k], ref[i][k])))
    report["bf16_worst_triton_err"] = max(rows, key=lambda r: r[1])
    report["bf16_worst_ref_err"] = max(rows, key=lambda r: r[2])
    _record("b_model_triton_vs_reference", **report)
    assert worst32[0] <= 1e-4, f"fp32: {worst32[1]} differs by {worst32[0]:.3g} (relative)"
    bad = [r for r in rows if not (r[1] <= 2 * r[2] + 1e-2 and r[1] <= 0.1)]
    assert not bad, "bf16 (name, triton err, reference err, triton vs reference): " + ", ".join(
        f"({k}, {a:.3g}, {b:.3g}, {c:.3g})" for k, a, b, c in bad)


# --------------------------------------------------------------------------------------- c. kernels at Qwen2.5 shapes


def _leaves(tensors, grad):
    return [t.detach().clone().requires_grad_(g) for t, g in zip(tensors, grad)]


def _fwd_bwd(fn, inputs, seed=7):
    """fn(*inputs) -> outputs, and the gradients of a random projection w.r.t. the inputs that need grad. The
    upstream gradients are bf16 values (exact in every dtype used), so that a bf16 run and its fp32 "truth"
    backpropagate the same numbers."""
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    ups = [dev_randn(*o.shape, seed=seed + i).bfloat16().to(o.dtype) for i, o in enumerate(out)]
    torch.autograd.backward(out, ups)
    return [o.detach() for o in out], [x.grad for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]


def _compare_three(name, kern, ref, truth, floor):
    """kern and ref (lists of tensors, bf16 or fp32) against truth (fp32 on the same inputs): the kernel's
    relative (Frobenius) and max-abs errors must each be <= 2x the reference's + floor (relative floor for
    Frobenius; for max-abs the floor times max|truth|)."""
    res, bad = [], []
    for i, (k, r, t) in enumerate(zip(kern, ref, truth)):
        assert k.shape == r.shape == t.shape, (name, i, k.shape, r.shape, t.shape)
        assert k.dtype == r.dtype, (name, i, k.dtype, r.dtype)
        scale = float(t.double().abs().max())
        row = dict(i=i, kern_rel=rel(k, t), ref_rel=rel(r, t), kern_max=maxabs(k, t), ref_max=maxabs(r, t),
                   scale=scale)
        res.append(row)
        if not (row["kern_rel"] <= 2 * row["ref_rel"] + floor and
                row["kern_max"] <= 2 * row["ref_max"] + floor * scale and row["kern_rel"] <= 2e-2):
            bad.append(row)
    _record(f"c_kernel_{name}", results=res)
    assert not bad, f"{name}: kernel less accurate than its reference: {bad}"


BF16_FLOOR = 2.0 ** -10  # a quarter of a bf16 ulp (2**-8 relative)


@needs_triton
def test_rms_norm_at_qwen_shape():
    """(8192, 3584) bf16 rows, weight with grad: y, dx, dw."""
    from psyche.kernels.rmsnorm import rms_norm_ref, rms_norm_triton

    x, w = dev_randn(8192, 3584, seed=0, scale=3.0), 1 + dev_randn(3584, seed=1, scale=0.1)
    bf = _leaves([x.bfloat16(), w.bfloat16()], [True, True])
    kern = _fwd_bwd(lambda x, w: rms_norm_triton(x, w, 1e-6), bf)
    bf = _leaves([x.bfloat16(), w.bfloat16()], [True, True])
    ref = _fwd_bwd(lambda x, w: rms_norm_ref(x, w, 1e-6), bf)
    f32 = _leaves([x.bfloat16().float(), w.bfloat16().float()], [True, True])
    truth = _fwd_bwd(lambda x, w: rms_norm_ref(x, w, 1e-6), f32)
    _compare_three("rms_norm", kern[0] + kern[1], ref[0] + ref[1], truth[0] + truth[1], BF16_FLOOR)


@needs_triton
def test_swiglu_at_qwen_shape():
    """(4096, 18944) bf16 gate and up (7B's MLP width): y, dgate, dup."""
    from psyche.kernels.swiglu import swiglu_ref, swiglu_triton

    g, u = dev_randn(4096, 18944, seed=2, scale=3.0).bfloat16(), dev_randn(4096, 18944, seed=3).bfloat16()
    kern = _fwd_bwd(swiglu_triton, _leaves([g, u], [True, True]))
    ref = _fwd_bwd(swiglu_ref, _leaves([g, u], [True, True]))
    truth = _fwd_bwd(swiglu_ref, _leaves([g.float(), u.float()], [True, True]))
    _compare_three("swiglu", kern[0] + kern[1], ref[0] + ref[1], truth[0] + truth[1], BF16_FLOOR)


@needs_triton
def test_rotary_at_qwen_shape():
    """B=2, T=2048, 28 query heads / 4 kv heads of 128 (7B), theta 1e6; q, k as the model passes them
    (transposed views of (B, T, H, D)); cos/sin per row in bf16, as the model makes them."""
    from psyche.kernels.rotary import rotary_ref, rotary_triton

    B, T, H, K, D = 2, 2048, 28, 4, 128
    q0, k0 = dev_randn(B, T, H, D, seed=4).bfloat16(), dev_randn(B, T, K, D, seed=5).bfloat16()
    pos = torch.arange(T, device=DEVICE).expand(B, T)
    inv = 1.0 / 1e6 ** (torch.arange(0, D, 2, device=DEVICE, dtype=torch.float32) / D)
    emb = torch.cat([pos[..., None].float() * inv] * 2, dim=-1)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()

    def run(fn, dtype):
        q, k = _leaves([q0.to(dtype), k0.to(dtype)], [True, True])
        return _fwd_bwd(lambda q, k: fn(q.transpose(1, 2), k.transpose(1, 2), cos.to(dtype), sin.to(dtype)), [q, k])

    kern, ref, truth = run(rotary_triton, torch.bfloat16), run(rotary_ref, torch.bfloat16), run(rotary_ref,
                                                                                                torch.float32)
    _compare_three("rotary", kern[0] + kern[1], ref[0] + ref[1], truth[0] + truth[1], BF16_FLOOR)


@needs_triton
def test_token_logprobs_at_qwen_shape():
    """N=1024 tokens, C=896 (0.5B), V=151,936, bf16 hidden and lm_head weight, both with grad, random upstream
    gradients on log-probs and entropy. The kernel keeps fp32 logits (never rounded), so its fp32 log-probs and
    entropies are within 1e-3 of the fp32 computation (values ~-12 and ~12); the streaming reference rounds the
    logits to bf16 first. dh, dw (bf16): no less accurate than the reference."""
    _token_logprobs_case(N=1024, C=896, V=151936)


def _token_logprobs_case(N, C, V):
    from psyche.kernels.logprobs import token_logprobs_naive, token_logprobs_ref, token_logprobs_triton

    h, w = dev_randn(N, C, seed=6).bfloat16(), dev_randn(V, C, seed=7, scale=0.02).bfloat16()
    y = torch.randint(0, V, (N,), generator=cpu_gen(8)).to(DEVICE)
    kern = _fwd_bwd(lambda h, w: token_logprobs_triton(h, w, y), _leaves([h, w], [True, True]))
    ref = _fwd_bwd(lambda h, w: token_logprobs_ref(h, w, y), _leaves([h, w], [True, True]))
    truth = _fwd_bwd(lambda h, w: token_logprobs_naive(h, w, y), _leaves([h.float(), w.float()], [True, True]))
    assert kern[0][0].dtype == torch.float32 and kern[1][0].dtype == torch.bfloat16
    fwd_err = [maxabs(k, t) for k, t in zip(kern[0], truth[0])]
    _record("c_kernel_token_logprobs_fwd", logp_max_abs=fwd_err[0], entropy_max_abs=fwd_err[1],
            ref_logp_max_abs=maxabs(ref[0][0], truth[0][0]))
    assert max(fwd_err) <= 1e-3, f"log-prob / entropy max abs error {fwd_err}"
    _compare_three("token_logprobs", kern[0] + kern[1], ref[0] + ref[1], truth[0] + truth[1], BF16_FLOOR)


# ------------------------------------------------------------------------------------------------- d. log-prob memory


@needs_cuda
def test_token_logprobs_peak_memory_quarter_of_naive():
    """Forward + backward of log-prob and entropy at V=151,936 (N=2048, C=896, bf16, grads for hidden and
    weight): peak CUDA memory above the inputs (gradients included, as they are outputs) of the kernel path
    (kernels.token_logprobs: Triton on CUDA) <= 1/4 of the naive path's, which holds (N, V) fp32 logits
    (1.2 GB each). The kernel path's peak is mostly the (V, C) weight gradient (272 MB)."""
    from psyche.kernels.logprobs import token_logprobs_naive

    N, C, V = 2048, 896, 151936
    h = dev_randn(N, C, seed=10).bfloat16().requires_grad_()
    w = dev_randn(V, C, seed=11, scale=0.02).bfloat16().requires_grad_()
    y = torch.randint(0, V, (N,), generator=cpu_gen(12)).to(DEVICE)
    g_lp, g_ent = dev_randn(N, seed=13), dev_randn(N, seed=14)

    def step(fn):
        h.grad = w.grad = None
        logp, ent = fn(h, w, y)
        (logp * g_lp + ent * g_ent).sum().backward()

    def peak(fn):
        step(fn)  # warm-up: compiles, fills caches
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    p_kern, p_naive = peak(kernels.token_logprobs), peak(token_logprobs_naive)
    _record("d_token_logprobs_peak_memory", kernel_mib=p_kern / 2**20, naive_mib=p_naive / 2**20,
            ratio=p_kern / p_naive, triton=kernels.use_triton(h))
    assert p_naive > N * V * 4, f"the naive path should hold at least one (N, V) fp32 tensor: {p_naive}"
    assert p_kern <= p_naive / 4, f"peak bytes: kernel path {p_kern}, naive {p_naive} ({p_kern / p_naive:.3f}x)"


# --------------------------------------------------------------------------------------------------------- e. sampler

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11], [40]]


@pytest.fixture(scope="module")
def pair():
    """transformers (eager) and psyche with the same tiny weights, fp32, on the device."""
    cfg = tiny_config(n_head=4, n_kv=2, vocab=96)
    hf = hf_model(cfg, seed=7)
    return hf.to(DEVICE), _to(psyche_from_hf(hf, cfg))


def test_greedy_generation_equals_transformers_ragged_batch(pair):
    """fp32, greedy, 4 ragged prompts, 16 new tokens: psyche's KV-cache sampler (right-padded prefill) gives
    transformers' tokens (left-padded generate). A difference is accepted only where transformers' own top-2
    logits are within 1e-4 (a tie that fp32 reduction order may break either way)."""
    from psyche.sampler import generate

    hf, m = pair
    r = generate(m, PROMPTS, max_new_tokens=16, temperature=0)
    assert r.tokens.device.type == DEVICE.type
    ids, att = left_padded(PROMPTS)
    T = ids.shape[1]
    with torch.no_grad():
        out = hf.generate(ids.to(DEVICE), attention_mask=att.to(DEVICE), max_new_tokens=16, do_sample=False,
                          pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    theirs, ours = out.sequences[:, T:].cpu(), r.tokens.cpu()
    assert theirs.shape == ours.shape
    ties = []
    for i in range(len(PROMPTS)):
        diff = (theirs[i] != ours[i]).nonzero()
        if len(diff):
            t = int(diff[0])
            top2 = out.scores[t][i].float().topk(2).values
            gap = float(top2[0] - top2[1])
            assert gap < 1e-4, f"row {i} differs at step {t} ({ours[i].tolist()} vs {theirs[i].tolist()}), " \
                               f"top-2 logit gap {gap:.3g}: not a tie"
            ties.append((i, t, gap))
    _record("e_greedy_vs_transformers", rows_differing_at_ties=ties)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampler_logprobs_equal_a_plain_forward(pair, dtype):
    """Sampled completions (temperature 0.8, top-k 20, stop ids, 2 per prompt): the log-prob the sampler
    reports for each token equals log_softmax(logits / 0.8) of a plain forward over the final sequence, and
    the trainer's fused path (model(..., targets=)). fp32: max abs 1e-4. bf16: max abs 0.1 and mean abs 0.02:
    bf16 logits (|z| ~1, ulp ~0.008) from a cached decode vs a full forward round differently."""
    from psyche.sampler import generate

    _, m = pair
    m = copy.deepcopy(m).to(dtype)
    r = generate(m, PROMPTS, n=2, max_new_tokens=10, temperature=0.8, top_k=20, stop_token_ids=[1, 2], seed=3)
    got, want, fused = [], [], []
    for i in range(len(r.lengths)):
        p = PROMPTS[int(r.prompt_index[i])]
        L = int(r.lengths[i])
        comp = r.tokens[i, :L]
        seq = torch.cat([torch.tensor(p, device=DEVICE), comp])[None]
        targets = torch.full_like(seq, -1)
        targets[0, len(p) - 1: len(p) - 1 + L] = comp
        with torch.no_grad():
            logp = torch.log_softmax(m(seq)[0].float() / 0.8, -1)
            lp_fused, _ = m(seq, targets=targets, temperature=0.8)
        got.append(r.logprobs[i, :L])
        want.append(logp[len(p) - 1: len(p) - 1 + L].gather(-1, comp[:, None]).squeeze(-1))
        fused.append(lp_fused[0, len(p) - 1: len(p) - 1 + L])
        assert (r.logprobs[i, L:] == 0).all()
    got, want, fused = torch.cat(got), torch.cat(want), torch.cat(fused)
    d_plain, d_fused = (got - want).abs(), (got - fused).abs()
    _record(f"e_sampler_logprobs[{dtype}]", max_abs_vs_forward=float(d_plain.max()),
            mean_abs_vs_forward=float(d_plain.mean()), max_abs_vs_fused=float(d_fused.max()),
            mean_abs_vs_fused=float(d_fused.mean()), tokens=len(got))
    if dtype == torch.float32:
        assert float(d_plain.max()) <= 1e-4 and float(d_fused.max()) <= 1e-4, (float(d_plain.max()),
                                                                               float(d_fused.max()))
    else:
        for d in (d_plain, d_fused):
            assert float(d.max()) <= 0.1 and float(d.mean()) <= 0.02, (float(d.max()), float(d.mean()))


def test_graph_decode_equals_eager_and_captures_once_per_shape(pair, monkeypatch):
    """The default CUDA path ("graph"): the step captured as a torch.cuda.CUDAGraph per buffer set and sampling
    setting, with no compile. Tokens, log-probs and streamed events equal the eager path's (fp32) through
    rebucketing (minimum batch lowered to 1) and streaming; a second call of the same shapes captures nothing;
    each capture's time is recorded."""
    import time

    import psyche.static_decode as sd
    from psyche.sampler import generate

    monkeypatch.setattr(sd, "REBUCKET_MIN", 1)
    times = []
    real = sd.GraphStep._capture

    def timed(self, model):
        torch.cuda.synchronize()
        t = time.perf_counter()
        real(self, model)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)

    monkeypatch.setattr(sd.GraphStep, "_capture", timed)
    _, m = pair
    prompts = PROMPTS * 2
    kw = dict(n=2, max_new_tokens=40, temperature=1.0, top_p=0.9, stop_token_ids=[1, 2, 3], seed=5)

    def run(path, model=m):
        seen = []
        r = generate(model, prompts, path=path, on_token=lambda t, rows, tok: seen.append((t, rows.tolist(),
                                                                                         tok.tolist())), **kw)
        return r, seen

    (a, seen_a), (b, seen_b) = run("graph"), run("eager")
    n_captures = len(times)
    c, _ = run("graph")
    _record("e_graph_decode", capture_s=times, captures_first_call=n_captures,
            captures_second_call=len(times) - n_captures)
    assert n_captures >= 1 and len(times) == n_captures
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths) and seen_a == seen_b
    assert float((a.logprobs - b.logprobs).abs().max()) <= 1e-5
    assert torch.equal(c.tokens, a.tokens)
    other = copy.deepcopy(m)  # the same shapes, other weights at other addresses: its own capture, its own tokens
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
    (d, _), (e, _) = run("graph", other), run("eager", other)
    assert torch.equal(d.tokens, e.tokens) and not torch.equal(d.tokens, a.tokens)


@pytest.mark.compile
def test_compiled_decode_replays_cuda_graphs_and_equals_eager(pair, monkeypatch):
    """The compiled static path on CUDA (mode "reduce-overhead"): torch.compile skips no CUDA graph (every
    input the step mutates is a pooled buffer marked static), a second call of the same shapes records no new
    graph, and the tokens, log-probs and streamed events equal the eager path's (fp32), through rebucketing
    (minimum batch lowered to 1) and streaming."""
    from torch._dynamo.utils import counters

    import psyche.static_decode as sd
    from psyche.sampler import generate

    monkeypatch.setattr(sd, "REBUCKET_MIN", 1)
    _, m = pair
    prompts = PROMPTS * 2
    kw = dict(n=2, max_new_tokens=40, temperature=1.0, top_p=0.9, stop_token_ids=[1, 2, 3], seed=5)

    def run(path):
        seen = []
        r = generate(m, prompts, path=path, on_token=lambda t, rows, tok: seen.append((t, rows.tolist(),
                                                                                     tok.tolist())), **kw)
        return r, seen

    counters.clear()
    (a, seen_a), (b, seen_b) = run("compiled"), run("eager")
    skips = counters["inductor"]["cudagraph_skips"]
    recorded = dict(counters["inductor"])
    c, _ = run("compiled")
    _record("e_compiled_decode_cuda_graphs", cudagraph_skips=skips, inductor_counters_first=recorded,
            inductor_counters_after_second=dict(counters["inductor"]))
    assert skips == 0, f"torch.compile skipped {skips} CUDA graph(s): {recorded}"
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths) and seen_a == seen_b
    assert float((a.logprobs - b.logprobs).abs().max()) <= 1e-5
    assert torch.equal(c.tokens, a.tokens)


# ---------------------------------------------------------------------------------------------- f. SFT and GRPO steps

SFT_DATA = ROOT / "configs" / "data" / "tiny-sft.jsonl"


@pytest.fixture(scope="module")
def sft_setup(tiny_ckpt):
    from psyche.data import load_messages, tokenize
    from psyche.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_ckpt)
    return tiny_ckpt, tok, tokenize(load_messages([SFT_DATA]), tok, max_length=128)


class _GradCapture:
    """Stands in for the optimizer in sft.train_step: keeps the gradients of the step instead of applying them."""

    def __init__(self, params):
        self.params, self.grads = list(params), None

    def step(self):
        self.grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def _batches(setup, micro, G=8):
    from psyche.data import SFTBatches

    _, tok, samples = setup
    return SFTBatches(samples, global_batch=G, micro_batch=micro, world_size=1, packing=True, max_length=128,
                      pad_id=tok.pad_id, seed=0)


def test_sft_step_on_device(sft_setup):
    """The SFT step as run_sft runs it on this device (fp32 master weights; on CUDA bf16 autocast, the
    compute dtype 'auto' resolves to): 3 steps on the same packed global batch (2 micro-batches), finite loss
    and gradient norm, loss falling; the first bf16 loss within 2% of the fp32 loss of the same weights."""
    from psyche import dist
    from psyche.run import build_model_for_training, build_optimizer, resolve_dtype
    from psyche.sft import train_step

    init = sft_setup[0]
    mbs = _batches(sft_setup, micro=4).micro_batches(0, 0)
    compute = resolve_dtype("auto", DEVICE)
    losses = {}
    for dtype in dict.fromkeys([compute, torch.float32]):
        torch.manual_seed(0)
        model = build_model_for_training(init, DEVICE, compute_dtype=dtype)
        assert next(model.parameters()).device.type == DEVICE.type
        opt = build_optimizer(model, OptimSection(lr=1e-2))
        amp = dist.autocast(model, DEVICE, dtype)
        steps = [train_step(model, opt, mbs, device=DEVICE, grad_clip=1.0, amp=amp) for _ in range(3)]
        for s in steps:
            assert all(torch.isfinite(torch.tensor(float(s[k]))) for k in ("loss", "grad_norm")), s
        losses[str(dtype)] = [s["loss"] for s in steps]
        assert steps[2]["loss"] < steps[0]["loss"], losses
    _record("f_sft_step", losses=losses, compute=str(compute))
    first, first32 = losses[str(compute)][0], losses[str(torch.float32)][0]
    assert abs(first - first32) <= 0.02 * abs(first32), losses


def test_sft_gradient_same_with_one_or_two_micro_batches(sft_setup):
    """fp32 on the device: one micro-batch of 8 packed rows vs two of 4 give the same loss and gradient
    (train_step divides by the global target count), up to fp32 reduction order: relative 1e-5."""
    from psyche.run import build_model_for_training
    from psyche.sft import train_step

    init = sft_setup[0]
    res = {}
    for micro in (8, 4):
        model = build_model_for_training(init, DEVICE)
        cap = _GradCapture(model.parameters())
        mbs = _batches(sft_setup, micro=micro).micro_batches(0, 0)
        assert len(mbs) == 8 // micro
        m = train_step(model, cap, mbs, device=DEVICE, grad_clip=0.0, amp=contextlib.nullcontext())
        res[micro] = (m["loss"], torch.cat([g.flatten() for g in cap.grads]))
    g_rel = rel(res[4][1], res[8][1])
    _record("f_sft_micro_batches", loss_1=res[8][0], loss_2=res[4][0], grad_rel=g_rel)
    assert abs(res[4][0] - res[8][0]) <= 1e-5 * abs(res[8][0])
    assert g_rel <= 1e-5, g_rel


GRPO_PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]


def _grpo_batch(model, seed=0):
    from psyche.grpo import build_batch, compute_advantages, sequence_logprobs
    from psyche.sampler import generate

    r = generate(model, GRPO_PROMPTS, n=4, max_new_tokens=12, temperature=1.0, stop_token_ids=[3], seed=seed)
    b = build_batch(GRPO_PROMPTS, r, 0)
    assert b.input_ids.device.type == DEVICE.type
    b.rewards = torch.rand(12, generator=cpu_gen(seed)).to(DEVICE)
    b.advantages = compute_advantages(b.rewards, 4)
    with torch.no_grad():
        b.ref_logp = sequence_logprobs(build_model(tiny_config(vocab=40), device=DEVICE, seed=9), b, 1.0)[0]
        lp = sequence_logprobs(model, b, 1.0)[0]
    return b, lp


def test_grpo_update_on_device():
    """One GRPO update (clipped policy loss + k3 KL + entropy bonus) on the device.
    - fp32 (run_grpo with model.dtype = float32): the trainer's recomputed log-probs equal the sampler's (max
      abs 1e-4); 1 vs 2 micro-batches give the same gradient (relative 1e-5).
    - an AdamW update under bf16 autocast (as SFT runs on CUDA): finite loss and gradient norm, weights move."""
    from psyche import dist
    from psyche.grpo import LossConfig, UpdatePlan, update_policy

    model = build_model(tiny_config(vocab=40), device=DEVICE, seed=1)
    b, lp = _grpo_batch(model)
    gap = float((lp[b.mask] - b.sampler_logp[b.mask]).abs().max())
    b.old_logp = lp + 0.05 * torch.randn(b.mask.shape, generator=cpu_gen(1)).to(DEVICE) * b.mask
    lc = LossConfig(kl_coef=0.1, entropy_coef=0.01)
    grads = {}
    for micro in (12, 6):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: read the gradient, keep the weights
        st = update_policy(m, opt, b, lc, UpdatePlan(12, micro, grad_clip=0))
        assert torch.isfinite(torch.tensor(st["loss"])), st
        grads[micro] = torch.cat([p.grad.flatten() for p in m.parameters()])
    g_rel = rel(grads[6], grads[12])
    m = copy.deepcopy(model)
    before = [p.detach().clone() for p in m.parameters()]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    with dist.autocast(m, DEVICE, torch.bfloat16):
        st = update_policy(m, opt, b, lc, UpdatePlan(6, 3, grad_clip=1.0), clip_fn=dist.clip_grad_norm_)
    with torch.no_grad():
        moved = max(float((p - q).abs().max()) for p, q in zip(m.parameters(), before))
    _record("f_grpo_update", sampler_trainer_gap=gap, grad_rel_1_vs_2=g_rel, amp_loss=st["loss"],
            amp_grad_norm=st["grad_norm"], moved=moved)
    assert gap <= 1e-4, f"sampler vs trainer log-probs differ by {gap:.3g} (fp32)"
    assert g_rel <= 1e-5, g_rel
    assert all(torch.isfinite(torch.tensor(float(st[k]))) for k in ("loss", "grad_norm")), st
    assert st["optimizer_steps"] == 2 and moved > 0


def test_grpo_with_a_bf16_compute_dtype_on_device(tmp_path, tiny_ckpt, monkeypatch):
    """run_grpo with model.dtype = bfloat16 on one unsharded device: every linear layer of the rollouts, the
    reference / old log-probs and the update computes in bf16 (autocast), while the policy's master weights, its
    gradients and the checkpoint stay fp32. (The rollouts run eager here, so that the hooks see every layer.)"""
    from safetensors.torch import load_file

    from psyche.checkpoint import latest_checkpoint
    from psyche.config import load_run_config
    from psyche.grpo.loop import run_grpo

    monkeypatch.setenv("PSYCHE_SAMPLER", "eager")
    seen = []

    def spy(module, args, out):
        if isinstance(module, torch.nn.Linear) and torch.is_tensor(out):
            seen.append((out.dtype, module.weight.dtype, torch.is_grad_enabled(), out.device.type))

    cfg = load_run_config(ROOT / "configs" / "tiny-grpo.toml", [
        "model.dtype=\"bfloat16\"", f"model.init={json.dumps(str(tiny_ckpt))}", f"run.out={json.dumps(str(tmp_path))}",
        "grpo.steps=1", "log.progress=false", "checkpoint.every=1", "checkpoint.export=false", "grpo.dump_every=0",
        f"grpo.paths=[{json.dumps(str(ROOT / 'configs' / 'data' / 'tiny-grpo.jsonl'))}]"])
    handle = torch.nn.modules.module.register_module_forward_hook(spy)
    try:
        run_grpo(cfg)
    finally:
        handle.remove()
    policy = [s for s in seen if s[1] == torch.float32]
    _record("f_grpo_bf16", linear_calls=len(seen), policy_calls=len(policy),
            out_dtypes=sorted({str(s[0]) for s in seen}), devices=sorted({s[3] for s in seen}))
    assert seen and all(out == torch.bfloat16 for out, *_ in seen), sorted({str(s[:2]) for s in seen})
    assert {s[3] for s in seen} == {DEVICE.type}
    assert any(grad for _, _, grad, _ in policy) and any(not grad for _, _, grad, _ in policy)  # update, rollouts
    state = load_file(str(latest_checkpoint(tmp_path) / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in state.values())


# -------------------------------------------------------------------------------------------- f. the loops end to end


def _train(stage, config, out, *sets, timeout=120):
    cmd = [sys.executable, "train.py", "--stage", stage, "--config", str(ROOT / "configs" / config), "--out",
           str(out), "--set", "log.progress=false", *[a for s in sets for a in ("--set", s)]]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_subprocess_env())
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


def test_sft_loop_end_to_end(tmp_path, tiny_ckpt):
    """train.py --stage sft on the tiny config, 4 steps, compute dtype auto (bf16 autocast on CUDA), a
    checkpoint and the HF export: it runs on the device, losses are finite, the export loads."""
    from psyche.metrics import read_metrics
    from psyche.weights import load_pretrained

    out = tmp_path / "sft"
    log = _train("sft", "tiny-sft.toml", out, "sft.max_steps=4", "checkpoint.every=4", "model.dtype=\"auto\"",
                 f"model.init={json.dumps(str(tiny_ckpt))}")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in rows), rows
    assert f"rank, {DEVICE.type}" in log, log[:2000]  # "# resolved config (1 rank, cuda:0)"
    if ON_CUDA:
        assert "mem_gb" in rows[0] and "compute torch.bfloat16" in log
    m, _ = load_pretrained(out / "hf")
    assert sum(p.numel() for p in m.parameters()) > 0
    _record("f_sft_loop", losses=[r["loss"] for r in rows], tok_per_s=[r.get("tok_per_s") for r in rows])


def test_grpo_loop_end_to_end(tmp_path, tiny_ckpt):
    """train.py --stage grpo on the tiny config (rollouts with the KV-cache sampler, reference model, k3 KL,
    exact KL, two optimizer steps per rollout batch), 2 steps on the device: finite loss and grad norm, and
    the sampler-vs-trainer log-prob gap small (fp32 weights: < 1e-3)."""
    from psyche.metrics import read_metrics

    out = tmp_path / "grpo"
    _train("grpo", "tiny-grpo.toml", out, "grpo.steps=2", "checkpoint.every=0", "checkpoint.export=false",
           "model.dtype=\"auto\"", f"model.init={json.dumps(str(tiny_ckpt))}")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(torch.isfinite(torch.tensor(float(r[k]))) for k in ("loss", "grad_norm", "kl_exact")), r
        assert r["logprob_gap"] < 1e-3, r
    _record("f_grpo_loop", rows=[{k: r.get(k) for k in ("loss", "grad_norm", "logprob_gap", "kl", "kl_exact",
                                                        "time_rollout", "time_update")} for r in rows])


# ---------------------------------------------------------------------------------------------- g. FSDP2, one process

FSDP_WORKER = """
import os, sys
from pathlib import Path
import torch
import torch.distributed as tdist
from torch.distributed.tensor import DTensor
from psyche import dist
from psyche.sampler import generate
from psyche.weights import load_pretrained

init, kind = Path(sys.argv[1]), sys.argv[2]
torch.backends.cuda.matmul.allow_tf32 = False
if kind == "cuda":
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    tdist.init_process_group("nccl", device_id=device)  # psyche.dist only starts a group for > 1 rank
else:
    device = torch.device("cpu")
    tdist.init_process_group("gloo")
assert dist.init_distributed()[1] == 1 and dist.get_world_size() == 1

def train_step(model):
    x = torch.randint(0, model.config.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0)).to(device)
    logp, _ = model(x[:, :-1], targets=x[:, 1:])
    loss = -logp.mean()
    loss.backward()
    norm = dist.clip_grad_norm_(list(model.parameters()), 0.0)
    full = lambda g: g.full_tensor() if isinstance(g, DTensor) else g
    return float(loss), float(norm), {n: full(p.grad).float() for n, p in model.named_parameters()}

plain, _ = load_pretrained(init, dtype=torch.float32, device=device)
loss0, norm0, g0 = train_step(plain.train())
res = {}
for name, pdt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    m, _ = load_pretrained(init, dtype=torch.float32, device=device)
    dist.parallelize(m.train(), shard=True, param_dtype=pdt, reduce_dtype=torch.float32)
    assert dist.is_sharded(m) and isinstance(m.model.layers[0].mlp.up_proj.weight, DTensor)
    loss, norm, g = train_step(m)
    assert g.keys() == g0.keys()
    grad_rel = max(float((g[k] - g0[k]).norm() / g0[k].norm().clamp_min(1e-30)) for k in g0)
    res[name] = dict(loss=loss, norm=norm, grad_rel=grad_rel)
    if name == "fp32":
        with torch.no_grad(), dist.unsharded(m):
            assert not isinstance(m.lm_head.weight, DTensor)
            a = generate(m, [[5, 6, 7], [8]], max_new_tokens=6, temperature=0).tokens
        b = generate(plain, [[5, 6, 7], [8]], max_new_tokens=6, temperature=0).tokens
        res[name]["rollout_equal"] = bool(torch.equal(a, b))
print("FSDP_RESULT", loss0, norm0, res)
r = res["fp32"]
assert abs(r["loss"] - loss0) <= 1e-5 * abs(loss0) and r["grad_rel"] <= 1e-5 and r["rollout_equal"], (loss0, res)
r = res["bf16"]
assert abs(r["loss"] - loss0) <= 2e-2 * abs(loss0) and r["grad_rel"] <= 0.1 and r["norm"] == r["norm"], (loss0, res)
print("FSDP_OK")
dist.cleanup()
"""


def test_fsdp2_one_process_equals_unsharded(tmp_path, tiny_ckpt):
    """torchrun --nproc_per_node=1 (nccl on CUDA, gloo on CPU), psyche.dist.parallelize(shard=True) on the one
    rank (FSDP2 per block + root, MixedPrecisionPolicy, sum reduction): fp32 params give the unsharded model's
    loss (relative 1e-5) and gradients (relative 1e-5 per parameter), and dist.unsharded() rollouts equal the
    plain model's; bf16 params (fp32 reduce) give the loss within 2% and gradients within 10%."""
    script = tmp_path / "fsdp_worker.py"
    script.write_text(textwrap.dedent(FSDP_WORKER))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script),
           str(tiny_ckpt), DEVICE.type]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=_subprocess_env())
    out = r.stdout + r.stderr
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("FSDP_RESULT")), None)
    _record("g_fsdp_one_process", result=line)
    assert r.returncode == 0 and "FSDP_OK" in r.stdout, out[-5000:]
