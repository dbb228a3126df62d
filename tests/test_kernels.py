"""Every Triton kernel against its PyTorch reference, forward and backward, on small odd shapes.

Without a GPU the kernels run on CPU tensors under triton's interpreter (`TRITON_INTERPRET=1`, ~4000x
slower than eager: shapes stay small); if this process imported triton before it could ask for the
interpreter, those tests run in a fresh process instead. Tolerances, per dtype:
- fp32: atol = rtol = 1e-5. Kernel and reference do the same fp32 arithmetic in a different order
  (reductions, 1/T multiplied instead of divided); observed differences are ~1e-6.
- bf16: atol = rtol = 2e-2, about 2.5 bf16 ulps (2**-8 relative per ulp). The kernels upcast, compute in
  fp32 and round once; the references round to bf16 after every op (e.g. rotary: two products and a sum),
  and the interpreter rounds to bf16 by truncation. Both add up to ~2 ulps.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# triton reads TRITON_INTERPRET when `@triton.jit` runs: for its own helpers (tl.sum, ...) when triton is
# first imported, for ours when psyche/kernels/ is. Set it before either; on a GPU machine leave it unset so that
# the same tests run the compiled kernels on CUDA.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from psyche import kernels  # noqa: E402
from psyche.kernels.logprobs import token_logprobs_naive, token_logprobs_ref  # noqa: E402
from psyche.kernels.rmsnorm import rms_norm_ref  # noqa: E402
from psyche.kernels.rotary import rotary_ref  # noqa: E402
from psyche.kernels.swiglu import swiglu_ref  # noqa: E402


def _can_run_triton() -> bool:
    """On CUDA always; on CPU only if triton was imported under the interpreter. It was not if another test
    module imported triton first (transformers does); the Triton tests then run in a fresh process."""
    if torch.cuda.is_available():
        return True
    import triton.language as tl

    return type(tl.sum).__name__ == "InterpretedFunction"


CAN_RUN_TRITON = kernels.HAS_TRITON and _can_run_triton()
_TRITON_TESTS = []


def needs_triton(test):
    """A test that runs Triton kernels: skipped without triton, and run in a fresh process (by
    test_triton_kernels_in_a_fresh_process) when this one imported triton without the interpreter."""
    _TRITON_TESTS.append(test.__name__)
    test = pytest.mark.skipif(kernels.HAS_TRITON and not CAN_RUN_TRITON,
                              reason="triton was imported here before TRITON_INTERPRET was set: run in a fresh "
                                     "process by test_triton_kernels_in_a_fresh_process")(test)
    return pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed (pip install triton)")(test)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.bfloat16]
REPO = Path(__file__).resolve().parents[1]


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def _fwd_bwd(fn, inputs, seed=0):
    """Outputs of fn(*inputs) and the gradients of a random projection of them w.r.t. every float input."""
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    grads = [torch.randn(o.shape, device=o.device, generator=gen).to(o.dtype) for o in out]
    torch.autograd.backward(out, grads)
    return [o.detach() for o in out], [x.grad for x in inputs if x.requires_grad]


def _assert_same(ref, got, dtype, what):
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}[{i}]: {b.dtype}{tuple(b.shape)}"
        torch.testing.assert_close(b.float(), a.float(), **TOL[dtype], msg=lambda m: f"{what}[{i}]: {m}")


def _rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, device=DEVICE, generator=gen) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------- RMSNorm


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    from psyche.kernels.rmsnorm import rms_norm_triton

    x, w = _rand(3, 123, 213, dtype=dtype, scale=3.0), (1 + _rand(213, scale=0.5, seed=1)).to(dtype)  # 369 rows
    ref = _fwd_bwd(lambda x, w: rms_norm_ref(x, w, 1e-6), _leaves(x, w))
    got = _fwd_bwd(lambda x, w: rms_norm_triton(x, w, 1e-6), _leaves(x, w))
    _assert_same(ref[0], got[0], dtype, "y")
    _assert_same(ref[1], got[1], dtype, "dx, dw")


@needs_triton
def test_rms_norm_strided_input_and_frozen_weight():
    from psyche.kernels.rmsnorm import rms_norm_triton

    x = _rand(37, 5, 64).transpose(0, 1)  # (5, 37, 64), rows not contiguous
    w = 1 + _rand(64, scale=0.5, seed=1)
    ref = _fwd_bwd(lambda x: rms_norm_ref(x, w, 1e-5), _leaves(x))
    got = _fwd_bwd(lambda x: rms_norm_triton(x, w, 1e-5), _leaves(x))
    _assert_same(ref[0] + ref[1], got[0] + got[1], torch.float32, "y, dx")


# ---------------------------------------------------------------------------------------------- rotary


def _cos_sin(B, T, D, dtype, theta=1e4):
    pos = torch.randint(0, 300, (B, T), device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(5))
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, device=DEVICE, dtype=torch.float32) / D)
    emb = torch.cat([pos[..., None].float() * inv_freq] * 2, dim=-1)  # (B, T, D), as psyche's RotaryEmbedding
    return emb.cos().to(dtype), emb.sin().to(dtype)


@needs_triton
@pytest.mark.parametrize("dtype,B_cos", [(torch.float32, "per-row"), (torch.bfloat16, "per-row"),
                                         (torch.float32, "broadcast")])
def test_rotary(dtype, B_cos):
    from psyche.kernels.rotary import rotary_triton

    B, T, H, K, D = 3, 23, 7, 1, 18  # 7 query heads per kv head (7B's ratio); D/2 = 9, not a power of 2
    q0, k0 = _rand(B, T, H, D, dtype=dtype), _rand(B, K, T, D, dtype=dtype, seed=1)
    cos, sin = _cos_sin(B if B_cos == "per-row" else 1, T, D, dtype)

    def run(fn, q0, k0):  # q as the model makes it: a transposed view of (B, T, H, D)
        return fn(q0.transpose(1, 2), k0, cos, sin)

    ref = _fwd_bwd(lambda q, k: run(rotary_ref, q, k), _leaves(q0, k0))
    got = _fwd_bwd(lambda q, k: run(rotary_triton, q, k), _leaves(q0, k0))
    _assert_same(ref[0], got[0], dtype, "q, k")
    _assert_same(ref[1], got[1], dtype, "dq, dk")


# ---------------------------------------------------------------------------------------------- SwiGLU


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype):
    from psyche.kernels.swiglu import swiglu_triton

    g, u = _rand(3, 423, 213, dtype=dtype, scale=3.0), _rand(3, 423, 213, dtype=dtype, seed=1)
    ref = _fwd_bwd(swiglu_ref, _leaves(g, u))
    got = _fwd_bwd(swiglu_triton, _leaves(g, u))
    _assert_same(ref[0], got[0], dtype, "y")
    _assert_same(ref[1], got[1], dtype, "dgate, dup")


# ---------------------------------------------------------------------------------------------- log-probs

N, V, C = 37, 301, 53  # odd everywhere: partial token blocks, vocab tiles, vocab splits and C steps


def _exact(h, w, y, temperature, dtype):
    """The naive computation in float64: outputs as fp32 (what the kernels return), gradients in `dtype`."""
    out, grads = _fwd_bwd(lambda h, w: token_logprobs_naive(h, w, y, temperature), _leaves(h.double(), w.double()))
    return [o.float() for o in out], [g.to(dtype) for g in grads]


def _lp_inputs(dtype=torch.float32, n=N):
    h, w = _rand(n, C, dtype=dtype, scale=1.0), _rand(V, C, dtype=dtype, scale=0.4, seed=1)
    y = torch.randint(0, V, (n,), device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(2))
    return h, w, y


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunks", [dict(), dict(chunk_size=8, vocab_chunk=50)])
def test_token_logprobs_ref_equals_naive(temperature, chunks):
    """The streaming reference is the naive (N, V) computation, blockwise: forward and backward."""
    h, w, y = _lp_inputs()
    ref = _exact(h, w, y, temperature, torch.float32)
    got = _fwd_bwd(lambda h, w: token_logprobs_ref(h, w, y, temperature, **chunks), _leaves(h, w))
    _assert_same(ref[0], got[0], torch.float32, "logp, entropy")
    _assert_same(ref[1], got[1], torch.float32, "dh, dw")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("block", [1 << 26, 3 * V])  # one block of tokens, or 3 tokens per block (a partial last)
def test_token_logprobs_uniform_grad_equals_naive(temperature, block, monkeypatch):
    """The uniform-gradient path (gradients made in the forward): SFT's loss -sum(logp) / n gives the naive
    computation's values and gradients; a loss it was not chosen for (random upstream gradients on both
    outputs, as GRPO's) is still differentiated exactly, by recomputing; so is a frozen lm_head."""
    import psyche.kernels.logprobs as lp_mod
    from psyche.kernels.logprobs import token_logprobs_uniform_grad

    monkeypatch.setattr(lp_mod, "FUSED_BLOCK", block)
    h, w, y = _lp_inputs()
    sft = lambda out: -out[0].sum() / N  # noqa: E731
    hr, wr = _leaves(h.double(), w.double())
    sft(token_logprobs_naive(hr, wr, y, temperature)).backward()
    hg, wg = _leaves(h, w)
    out = token_logprobs_uniform_grad(hg, wg, y, temperature)
    sft(out).backward()
    _assert_same([o.float() for o in token_logprobs_naive(h.double(), w.double(), y, temperature)],
                 [o.detach() for o in out], torch.float32, "logp, entropy")
    _assert_same([hr.grad.float(), wr.grad.float()], [hg.grad, wg.grad], torch.float32, "dh, dw (SFT loss)")
    ref = _exact(h, w, y, temperature, torch.float32)
    got = _fwd_bwd(lambda h, w: token_logprobs_uniform_grad(h, w, y, temperature), _leaves(h, w))
    _assert_same(ref[1], got[1], torch.float32, "dh, dw (other upstream gradients: recomputed)")
    hf = _leaves(h)[0]
    sft(token_logprobs_uniform_grad(hf, w, y, temperature)).backward()
    torch.testing.assert_close(hf.grad, hr.grad.float(), **TOL[torch.float32])


def test_token_logprobs_dispatch_takes_the_uniform_grad_path_for_large_vocabularies(monkeypatch):
    """kernels.token_logprobs(uniform_grad=True) takes the uniform-gradient path from UNIFORM_GRAD_MIN_VOCAB
    on (not under the Triton kernels), the streaming reference below it and without the flag."""
    import psyche.kernels.logprobs as lp_mod

    monkeypatch.setenv("PSYCHE_KERNELS", "reference")
    taken = []
    for name in ("token_logprobs_uniform_grad",):
        real = getattr(lp_mod, name)
        monkeypatch.setattr(lp_mod, name, lambda *a, _r=real, **k: (taken.append("uniform"), _r(*a, **k))[1])
    h, w, y = _lp_inputs()
    for flag, limit in ((True, V), (True, V + 1), (False, V)):
        monkeypatch.setattr(kernels, "UNIFORM_GRAD_MIN_VOCAB", limit)
        taken.clear()
        logp, _ = kernels.token_logprobs(h, w, y, uniform_grad=flag)
        assert taken == (["uniform"] if flag and limit <= V else []), (flag, limit)
        torch.testing.assert_close(logp, token_logprobs_naive(h, w, y)[0])


@needs_triton
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_triton_fp32(temperature):
    from psyche.kernels.logprobs import token_logprobs_triton

    h, w, y = _lp_inputs()
    ref = _exact(h, w, y, temperature, torch.float32)
    got = _fwd_bwd(lambda h, w: token_logprobs_triton(h, w, y, temperature), _leaves(h, w))
    _assert_same(ref[0], got[0], torch.float32, "logp, entropy")
    _assert_same(ref[1], got[1], torch.float32, "dh, dw")


@needs_triton
def test_token_logprobs_triton_bf16():
    """bf16 inputs: the kernel accumulates logits in fp32 and never rounds them, so its log-probs equal the
    exact computation on the same (bf16) values to fp32 tolerance; the gradients come back in bf16."""
    from psyche.kernels.logprobs import token_logprobs_triton

    h, w, y = _lp_inputs(torch.bfloat16)
    ref = _exact(h, w, y, 0.7, torch.bfloat16)
    got = _fwd_bwd(lambda h, w: token_logprobs_triton(h, w, y, 0.7), _leaves(h, w))
    _assert_same(ref[0], got[0], torch.float32, "logp, entropy")
    _assert_same(ref[1], got[1], torch.bfloat16, "dh, dw")


@needs_triton
def test_token_logprobs_triton_partial_grads():
    """Only the log-prob used (entropy's gradient is zero), and a frozen lm_head (no weight grad)."""
    from psyche.kernels.logprobs import token_logprobs_triton

    h, w, y = _lp_inputs()
    hr, hg = _leaves(h, h)
    (token_logprobs_naive(hr, w, y)[0] * 1.5).sum().backward()
    (token_logprobs_triton(hg, w, y)[0] * 1.5).sum().backward()
    torch.testing.assert_close(hg.grad, hr.grad, **TOL[torch.float32])
    with torch.no_grad():
        _assert_same(token_logprobs_naive(h, w, y), token_logprobs_triton(h, w, y), torch.float32, "no grad")


def test_token_logprobs_dispatch_shapes(monkeypatch):
    """(B, T, C) hidden and (B, T) targets in, (B, T) out; zero tokens allowed."""
    monkeypatch.setenv("PSYCHE_KERNELS", "reference")
    h, w, y = _lp_inputs()
    logp, ent = kernels.token_logprobs(h[:36].view(4, 9, C), w, y[:36].view(4, 9))
    assert logp.shape == ent.shape == (4, 9) and logp.dtype == torch.float32
    torch.testing.assert_close(logp.flatten(), token_logprobs_naive(h[:36], w, y[:36])[0])
    assert kernels.token_logprobs(h[:0], w, y[:0])[0].shape == (0,)


# ---------------------------------------------------------------------------------------------- end to end


@needs_triton
def test_tiny_model_with_triton_kernels_equals_reference(monkeypatch):
    """The tiny model's logits, per-token log-probs/entropy (its fused lm_head path, `targets=`) and every
    parameter gradient are the same with PSYCHE_KERNELS=triton as with the references."""
    from psyche.model_config import preset
    from psyche.model import build_model

    cfg = preset("tiny")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (2, 13), generator=gen).to(DEVICE)
    targets = torch.cat([x[:, 1:], torch.full((2, 1), -1, device=DEVICE)], 1)  # next token; the last position has none
    targets[0, :4] = -1  # e.g. prompt tokens: ignored
    g_logits = torch.randn(2, 13, cfg.vocab_size, generator=gen).to(DEVICE) * 1e-2
    g_lp, g_ent = torch.randn(2, 13, generator=gen).to(DEVICE), torch.randn(2, 13, generator=gen).to(DEVICE)

    def run(mode):
        monkeypatch.setenv("PSYCHE_KERNELS", mode)
        assert kernels.use_triton(x.float()) == (mode == "triton")
        m = build_model(cfg, device=DEVICE, seed=0)
        logits = m(x)
        logp, ent = m(x, targets=targets, temperature=0.7)
        ((logits * g_logits).sum() + (logp * g_lp).sum() + (ent * g_ent).sum()).backward()
        return [logits.detach(), logp.detach(), ent.detach()], {n: p.grad for n, p in m.named_parameters()}

    out_ref, grads_ref = run("reference")
    out_tri, grads_tri = run("triton")
    _assert_same(out_ref, out_tri, torch.float32, "logits, logp, entropy")
    assert grads_ref.keys() == grads_tri.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads_tri[name], grads_ref[name], **TOL[torch.float32], msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------- dispatch


def test_dispatch_switch(monkeypatch):
    x = torch.zeros(2, device=DEVICE)
    monkeypatch.setenv("PSYCHE_KERNELS", "reference")
    assert not kernels.use_triton(x) and not kernels.use_flash(x.bfloat16())
    monkeypatch.setenv("PSYCHE_KERNELS", "auto")
    assert kernels.use_triton(x) == (kernels.HAS_TRITON and x.is_cuda)
    assert not kernels.use_flash(x.cpu().bfloat16()), "flash-attn is for CUDA tensors only"
    monkeypatch.setenv("PSYCHE_KERNELS", "triton")
    assert kernels.use_triton(x.cpu()) == kernels.HAS_TRITON
    monkeypatch.setenv("PSYCHE_KERNELS", "fast")
    with pytest.raises(ValueError, match="PSYCHE_KERNELS"):
        kernels.use_triton(x)


def test_everything_imports_and_runs_without_triton_or_flash_attn():
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None      # makes `import triton` raise ImportError
        sys.modules["flash_attn"] = None
        import os
        os.environ["PSYCHE_KERNELS"] = "triton"  # asks for Triton: must fall back, not fail
        import torch
        from psyche import kernels
        from psyche.model_config import preset
        from psyche.model import build_model
        assert not kernels.HAS_TRITON and not kernels.use_triton(torch.zeros(1))
        m = build_model(preset("tiny"))
        x = torch.randint(0, 512, (1, 5))
        m(x).sum().backward()
        logp, ent = kernels.token_logprobs(m(x, return_hidden=True), m.lm_head.weight, x)
        assert logp.shape == (1, 5)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_cu_seqlens_from_doc_ids():
    doc = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 2, 2]])
    cu, max_len = kernels.cu_seqlens_from_doc_ids(doc)
    assert cu.tolist() == [0, 2, 5, 8, 10] and cu.dtype == torch.int32 and max_len == 3


@pytest.mark.skipif(not kernels.HAS_TRITON or CAN_RUN_TRITON, reason="the Triton tests run in this process")
def test_triton_kernels_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          " or ".join(_TRITON_TESTS)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-6000:]


_AOT = """
import importlib
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

R, RO, S, L = (importlib.import_module("psyche.kernels." + m) for m in ("rmsnorm", "rotary", "swiglu", "logprobs"))
FP32_PTRS = {"RSTD", "DW_PART", "PART", "LSE", "ENT", "DLOGP", "DENT"}
SIZES = {"N", "M", "V", "C", "T"}  # upper-case but scalars


def arg_type(a, dt, const):
    if a in const:
        return "constexpr"
    if a in SIZES:
        return "i32"
    if a == "TGT":
        return "*i64"
    if a in FP32_PTRS:
        return "*fp32"
    if a.isupper():  # the other pointers
        return "*" + dt
    return "fp32" if a in ("eps", "inv_temp") else "i32"


def compile(fn, dt, const, warps=4, stages=3):
    sig = {a: arg_type(a, dt, const) for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


for dt in ("bf16", "fp32"):
    dot = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_C=64, DOT_DTYPE=tl.bfloat16 if dt == "bf16" else tl.float32,
               PREC="tf32" if dt == "bf16" else "ieee")
    compile(L._logprobs_fwd_kernel, dt, dot, warps=8, stages=3 if dt == "bf16" else 2)
    compile(L._logprobs_dz_kernel, dt, dot, warps=8, stages=3 if dt == "bf16" else 2)
compile(R._rms_norm_fwd_kernel, "bf16", dict(BLOCK=4096), warps=8)
compile(R._rms_norm_bwd_kernel, "bf16", dict(BLOCK=4096), warps=8)
for inverse in (False, True):
    compile(RO._rotary_kernel, "bf16", dict(HALF=64, BLOCK_HQ=32, BLOCK_HK=4, BLOCK_D=64, INVERSE=inverse))
compile(S._swiglu_fwd_kernel, "bf16", dict(BLOCK=1024))
compile(S._swiglu_bwd_kernel, "bf16", dict(BLOCK=1024))
print("ok")
"""


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed (pip install triton)")
def test_kernels_compile_for_a_gpu():
    """The interpreter runs kernels as Python: it does not type-check them as the compiler does. Compile each
    one for sm_90 (Triton's bundled ptxas, no GPU needed) with the launch settings used on CUDA."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when unset
    out = subprocess.run([sys.executable, "-c", _AOT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-4000:]


# ---------------------------------------------------------------------------------------------- memory

_PEAK = """
import sys, torch
from psyche import kernels
from psyche.kernels.logprobs import token_logprobs_naive
N, C, V = {N}, {C}, 151936
g = torch.Generator().manual_seed(0)
h = torch.randn(N, C, generator=g).requires_grad_()
w = (torch.randn(V, C, generator=g) * 0.02).requires_grad_()
y = torch.randint(0, V, (N,), generator=g)
fn = token_logprobs_naive if sys.argv[1] == "naive" else kernels.token_logprobs
def rss(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":")) * 1024
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
base = rss("VmRSS")
logp, ent = fn(h, w, y)
(logp.sum() + 0.1 * ent.sum()).backward()
print(rss("VmHWM") - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS is read from Linux /proc")
def test_streaming_logprobs_peak_memory_is_an_eighth_of_naive():
    """Forward + backward at Qwen2.5's V = 151,936, each path in a fresh process: the streaming path's peak
    resident memory above its inputs (gradients included) is <= 1/8 of the naive (N, V) fp32 path's."""
    N, C = 512, 64  # naive logits: 297 MiB; C small so that the matmuls take no time
    env = {**os.environ, "PSYCHE_KERNELS": "reference"}
    peak = {}
    for path in ("naive", "streaming"):
        out = subprocess.run([sys.executable, "-c", _PEAK.format(N=N, C=C), path], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        peak[path] = int(out.stdout.strip().splitlines()[-1])
    assert peak["naive"] > 2 * N * 151936 * 4, f"naive should hold several (N, V) fp32 tensors: {peak}"
    assert peak["streaming"] <= peak["naive"] / 8, f"peak bytes {peak}"
