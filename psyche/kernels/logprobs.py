"""Per-token log-probs and entropy through the lm_head without holding (N, V) fp32 logits.

For hidden h (N, C), lm_head weight W (V, C) and z = h @ W.T / temperature:
    logp[i]    = z[i, y_i] - lse[i]                  lse = logsumexp(z[i])
    entropy[i] = lse[i] - sum_j p_ij z_ij            p = softmax(z[i])
and, for upstream gradients g (of logp) and e (of entropy), the gradient of the logits is
    dz_ij = g_i (1[j = y_i] - p_ij) - e_i p_ij (log p_ij + entropy_i)
so backward needs only (lse, entropy) per token besides the inputs: the logits are recomputed.
Both implementations keep, per token, the running max m, s = sum exp(z - m) and u = sum exp(z - m) (z - m)
(sums relative to m stay accurate in fp32), and finish with lse = m + log s, entropy = log s - u / s.

- `token_logprobs_ref`: PyTorch, streaming over tokens (chunk_size) and vocab (vocab_chunk) with an online
  logsumexp; an autograd.Function that saves (lse, entropy) and recomputes a (chunk, vocab_chunk) block of
  logits at a time in backward. Peak working memory is a few such blocks, whatever N and V.
- `token_logprobs_triton`: forward is one fused kernel (matmul tiles -> online logsumexp, target gather,
  entropy), no logits anywhere, the vocab split across programs when N is small; backward recomputes the
  logits one vocab slice at a time (~V/16 wide) in a kernel that writes dz for that slice only, (N, V/16),
  and hands the two gradient matmuls to cuBLAS (dh accumulates in fp32, dW is one matmul per slice).
- `token_logprobs_uniform_grad`: for a loss that gives every log-prob the same gradient (SFT), the gradients
  made in the forward from blocks of whole-vocabulary logits, three matmuls instead of four; exact for any
  other loss too (backward then recomputes as `token_logprobs_ref` does).
- `token_logprobs_naive`: full (N, V) logits, for tests and benchmarks.

Targets must lie in [0, V): mask ignored positions in the loss, not here.
"""

import torch
import torch.nn.functional as F

from psyche.kernels._triton import dot_dtype, num_programs, tl, triton


def _view(buf, n, v):
    """An (n, v) fp32 block in a flat buffer that is reused from block to block: on CPU a fresh large
    allocation costs a page fault per 4 KiB touched, as much as the elementwise work itself."""
    return buf[: n * v].view(n, v)


def _logits(h, w, temperature, buf):
    """(n, C) @ (v, C).T / temperature -> (n, v) fp32, written into `buf`."""
    z = _view(buf, h.shape[0], w.shape[0])
    if h.dtype == w.dtype == torch.float32:
        torch.mm(h, w.t(), out=z)
    else:
        z.copy_(h @ w.t())
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _buffers(hidden, weight, chunk_size, vocab_chunk):
    numel = min(hidden.shape[0], chunk_size) * min(weight.shape[0], vocab_chunk)
    return [torch.empty(numel, dtype=torch.float32, device=hidden.device) for _ in range(2)]


def _acc_mm(out, a, b):
    """out += a @ b, with `out` possibly wider (fp32) than a and b."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out += (a @ b).to(out.dtype)


class _StreamingLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, vocab_chunk):
        N, V = hidden.shape[0], weight.shape[0]
        lse = hidden.new_empty(N, dtype=torch.float32)
        ent, logp = torch.empty_like(lse), torch.empty_like(lse)
        zbuf, ebuf = _buffers(hidden, weight, chunk_size, vocab_chunk)
        for n0 in range(0, N, chunk_size):
            h, y = hidden[n0:n0 + chunk_size], targets[n0:n0 + chunk_size]  # (n, C), (n,)
            # Online logsumexp with sums relative to the running max m (shifted sums keep fp32 accurate):
            # s = sum exp(z - m), u = sum exp(z - m) (z - m); then lse = m + log s, entropy = log s - u / s.
            m = torch.full_like(lse[n0:n0 + chunk_size], torch.finfo(torch.float32).min)  # finite: 0 * m is 0
            s, u = torch.zeros_like(m), torch.zeros_like(m)
            zy = torch.zeros_like(m)  # z at the target
            for v0 in range(0, V, vocab_chunk):
                v1 = min(V, v0 + vocab_chunk)
                z = _logits(h, weight[v0:v1], temperature, zbuf)  # (n, v)
                m_new = torch.maximum(m, z.amax(1))
                alpha = (m - m_new).exp()  # rescales the sums kept so far; 0 on the first slice
                inside = (y >= v0) & (y < v1)
                zy += torch.where(inside, z.gather(1, (y - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], 0.0)
                z -= m_new[:, None]
                e = torch.exp(z, out=_view(ebuf, *z.shape))  # (n, v)
                s_new = alpha * s + e.sum(1)
                u = alpha * (u + s * (m - m_new)) + z.mul_(e).sum(1)  # z is spent: no third (n, v) tensor
                s = s_new
                m = m_new
            lse[n0:n0 + chunk_size] = m + s.log()
            ent[n0:n0 + chunk_size] = s.log() - u / s
            logp[n0:n0 + chunk_size] = zy - lse[n0:n0 + chunk_size]
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.temperature, ctx.chunk_size, ctx.vocab_chunk = temperature, chunk_size, vocab_chunk
        return logp, ent

    @staticmethod
    def backward(ctx, dlogp, dent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        dh, dw = _streaming_backward(hidden, weight, targets, lse, ent, dlogp, dent, ctx.temperature, ctx.chunk_size,
                                     ctx.vocab_chunk, *ctx.needs_input_grad[:2])
        return dh, dw, None, None, None, None


def _streaming_backward(hidden, weight, targets, lse, ent, dlogp, dent, T, chunk_size, vocab_chunk, need_h, need_w):
    """(d hidden, d weight) for upstream gradients dlogp, dent (N,), recomputing the logits block by block."""
    N, V = hidden.shape[0], weight.shape[0]
    if dlogp is None:
        dlogp = torch.zeros_like(lse)
    if dent is None:
        dent = torch.zeros_like(lse)
    # fp32 accumulators (for fp32 inputs they are the gradients themselves: no extra memory)
    dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    zbuf, pbuf = _buffers(hidden, weight, chunk_size, vocab_chunk)
    for n0 in range(0, N, chunk_size):
        n1 = min(N, n0 + chunk_size)
        h, y = hidden[n0:n1], targets[n0:n1]
        lse_c = lse[n0:n1, None]
        g, e = dlogp[n0:n1, None], dent[n0:n1, None]
        c = -(g + e * ent[n0:n1, None])  # (n, 1): dz = -p (g + e (log p + H)) = p (c - e log p)
        rows = torch.arange(n1 - n0, device=h.device)
        for v0 in range(0, V, vocab_chunk):
            v1 = min(V, v0 + vocab_chunk)
            w = weight[v0:v1]
            logp_all = _logits(h, w, T, zbuf).sub_(lse_c)  # (n, v) log p
            p = torch.exp(logp_all, out=_view(pbuf, *logp_all.shape))
            dz = logp_all.mul_(-e).add_(c).mul_(p)  # in place: three passes over the block
            inside = (y >= v0) & (y < v1)
            dz.index_put_((rows[inside], y[inside] - v0), g[inside, 0], accumulate=True)  # + g at the target
            if T != 1.0:
                dz.div_(T)  # z = raw / T
            dz = dz.to(weight.dtype)
            if need_h:
                _acc_mm(dh[n0:n1], dz, w)
            if need_w:
                _acc_mm(dw[v0:v1], dz.t(), h.to(weight.dtype))
    return (dh.to(hidden.dtype) if need_h else None, dw.to(weight.dtype) if need_w else None)


FUSED_BLOCK = 1 << 26  # the uniform-gradient path's logits block: tokens per block = this // V (256 MiB fp32)
SOFTMAX_ROWS = 64  # rows of a block turned into probabilities at a time (the size of the one temporary)


class _UniformGradLogprobs(torch.autograd.Function):
    """For a loss whose gradient is the same for every token's log-prob (SFT: -sum(logp) / n) and that does not
    use the entropy: the forward computes, block by block of whole-vocabulary logits, the outputs and the
    gradients of sum(logp) w.r.t. hidden and weight; backward scales them by the upstream gradient. Three
    matmuls in all, where recomputing the logits in backward takes four. If the upstream gradient turns out
    not to be uniform (or the entropy's is not zero), backward recomputes as the streaming path does: the
    gradient is exact either way, only the time differs."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, vocab_chunk):
        ctx.set_materialize_grads(False)
        N, V = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[:2]
        lse = hidden.new_empty(N, dtype=torch.float32)
        ent, logp = torch.empty_like(lse), torch.empty_like(lse)
        gh = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        gw = None  # (V, C) fp32, made by the first block's matmul (no zero-filled buffer: one pass less)
        n = max(1, min(N, FUSED_BLOCK // V))
        zbuf = torch.empty(n * V, dtype=torch.float32, device=hidden.device)
        for n0 in range(0, N, n):
            n1 = min(N, n0 + n)
            h, y = hidden[n0:n1], targets[n0:n1]
            rows = torch.arange(n1 - n0, device=h.device)
            z = _logits(h, weight, temperature, zbuf)  # (n, V) fp32
            m = z.amax(1)
            z -= m[:, None]  # shifted: the exponentials stay in range
            logp[n0:n1] = z[rows, y]  # shifted logit at the target; minus log(sum exp) below
            for r0 in range(0, n1 - n0, SOFTMAX_ROWS):  # z -> softmax in place, a few rows' temporary at a time
                zs = z[r0:r0 + SOFTMAX_ROWS]
                e = torch.exp(zs)
                total = e.sum(1)
                log_total = total.log()
                i = slice(n0 + r0, n0 + r0 + zs.shape[0])
                lse[i] = m[r0:r0 + SOFTMAX_ROWS] + log_total
                logp[i] -= log_total
                ent[i] = log_total - torch.bmm(e[:, None, :], zs[:, :, None]).view(-1) / total  # -sum p log p
                zs.copy_(e).div_(total[:, None])
            p = z
            if need_h or need_w:
                p[rows, y] -= 1.0  # p - onehot = d(-logp)/dz; backward scales it by the upstream gradient
                if temperature != 1.0:
                    p /= temperature  # z = raw / T
                dz = p.to(weight.dtype)
                if need_h:  # each block writes its own rows
                    gh[n0:n1] = dz @ weight if gh.dtype != dz.dtype else torch.mm(dz, weight, out=gh[n0:n1])
                if need_w and gw is None:
                    gw = (dz.t() @ h.to(weight.dtype)).float()
                elif need_w:
                    _acc_mm(gw, dz.t(), h.to(weight.dtype))
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.grads = (gh, gw)  # gradients of -sum(logp); scaled in place by backward, once
        ctx.temperature, ctx.chunk_size, ctx.vocab_chunk = temperature, chunk_size, vocab_chunk
        return logp, ent

    @staticmethod
    def backward(ctx, dlogp, dent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        (gh, gw), ctx.grads = ctx.grads, None
        uniform = dlogp is not None and bool((dlogp == dlogp[:1]).all()) and (dent is None or not dent.any())
        if not uniform or (gh is None and need_h) or (gw is None and need_w):
            # not the loss this path was chosen for, or a second backward: recompute, exactly
            dh, dw = _streaming_backward(hidden, weight, targets, lse, ent, dlogp, dent, ctx.temperature,
                                         ctx.chunk_size, ctx.vocab_chunk, need_h, need_w)
            return dh, dw, None, None, None, None
        c = -dlogp[0]  # gh, gw are the gradients of -sum(logp)
        dh = gh.mul_(c).to(hidden.dtype) if need_h else None
        dw = gw.mul_(c).to(weight.dtype) if need_w else None
        return dh, dw, None, None, None, None


def token_logprobs_ref(hidden, weight, targets, temperature: float = 1.0, chunk_size: int = 1024,
                       vocab_chunk: int = 8192):
    """hidden (N, C), weight (V, C), targets (N,) -> (logp (N,), entropy (N,)), both fp32.

    logp[i] = log softmax(hidden[i] @ weight.T / temperature)[targets[i]]; entropy of the same distribution.
    Differentiable w.r.t. hidden and weight through both outputs. At most a (chunk_size, vocab_chunk) block
    of logits (and two or three of its kind) exists at any time, forward or backward.
    """
    return _StreamingLogprobs.apply(hidden, weight, targets, float(temperature), chunk_size, vocab_chunk)


def token_logprobs_uniform_grad(hidden, weight, targets, temperature: float = 1.0, chunk_size: int = 1024,
                                vocab_chunk: int = 8192):
    """token_logprobs_ref's values and gradients, computed for a loss whose gradient is the same for every
    token's log-prob and zero for the entropy (SFT's mean negative log-likelihood): the gradients are made in
    the forward, from blocks of whole-vocabulary logits (FUSED_BLOCK elements), and backward only scales them.
    Any other upstream gradient is still exact (backward recomputes, as token_logprobs_ref does)."""
    return _UniformGradLogprobs.apply(hidden, weight, targets, float(temperature), chunk_size, vocab_chunk)


def token_logprobs_naive(hidden, weight, targets, temperature: float = 1.0):
    """The obvious way, for tests and benchmarks: full (N, V) fp32 logits."""
    logits = (hidden @ weight.t()).float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


if triton is not None:

    @triton.jit
    def _logits_tile(H, W, rows, cols, N, V_end, C, stride_h, stride_w, BLOCK_N: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
        """(BLOCK_N, BLOCK_V) fp32 tile of H[rows] @ W[cols].T, accumulated over C in BLOCK_C steps."""
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        h_ptr = H + rows.to(tl.int64)[:, None] * stride_h
        w_ptr = W + cols.to(tl.int64)[:, None] * stride_w
        rmask, vmask = rows[:, None] < N, cols[:, None] < V_end
        for c0 in range(0, C, BLOCK_C):
            k = c0 + tl.arange(0, BLOCK_C)[None, :]
            h = tl.load(h_ptr + k, mask=rmask & (k < C), other=0.0)  # (BLOCK_N, BLOCK_C)
            w = tl.load(w_ptr + k, mask=vmask & (k < C), other=0.0)  # (BLOCK_V, BLOCK_C)
            acc = tl.dot(h.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PREC)
        return acc

    @triton.jit
    def _logprobs_fwd_kernel(H, W, TGT, PART, N, V, C, tiles_per_split, stride_h, stride_w, inv_temp,
                             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
                             DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
        # grid (token blocks, vocab splits): each program runs an online logsumexp over its vocab split and
        # writes four partial sums per token; the splits are merged on the host side (tiny, (S, N)).
        pid_n, pid_s, n_splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        tgt = tl.load(TGT + rows, mask=rmask, other=-1)
        # Online logsumexp as in the reference: s = sum exp(z - m), u = sum exp(z - m) (z - m).
        m = tl.full((BLOCK_N,), -3.0e38, dtype=tl.float32)  # running max; finite, so that 0 * m is 0
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zy = tl.zeros((BLOCK_N,), dtype=tl.float32)  # z at the target, if it falls in this split
        v_begin = pid_s * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = _logits_tile(H, W, rows, cols, N, V, C, stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_C, DOT_DTYPE,
                             PREC) * inv_temp
            valid = (cols < v_end)[None, :]
            zy += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
            m_new = tl.maximum(m, tl.max(tl.where(valid, z, -3.0e38), axis=1))
            alpha = tl.exp(m - m_new)
            zs = tl.where(valid, z - m_new[:, None], 0.0)
            e = tl.where(valid, tl.exp(zs), 0.0)
            u = alpha * (u + s * (m - m_new)) + tl.sum(e * zs, axis=1)
            s = alpha * s + tl.sum(e, axis=1)
            m = m_new
        out = PART + pid_s * N + rows  # PART is (4, S, N)
        stride_k = n_splits * N
        tl.store(out, m, mask=rmask)
        tl.store(out + stride_k, s, mask=rmask)
        tl.store(out + 2 * stride_k, u, mask=rmask)
        tl.store(out + 3 * stride_k, zy, mask=rmask)

    @triton.jit
    def _logprobs_dz_kernel(H, W, TGT, LSE, ENT, DLOGP, DENT, DZ, N, v_start, v_end, C, stride_h, stride_w,
                            stride_dz, inv_temp, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_C: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
        # grid (token blocks, vocab tiles of the slice [v_start, v_end)): recompute one logits tile and
        # turn it into the gradient of the raw logits, written to DZ (N, v_end - v_start).
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        local = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        cols = v_start + local
        rmask = rows < N
        z = _logits_tile(H, W, rows, cols, N, v_end, C, stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_C, DOT_DTYPE,
                         PREC) * inv_temp
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)[:, None]
        ent = tl.load(ENT + rows, mask=rmask, other=0.0)[:, None]
        g = tl.load(DLOGP + rows, mask=rmask, other=0.0)[:, None]
        e = tl.load(DENT + rows, mask=rmask, other=0.0)[:, None]
        tgt = tl.load(TGT + rows, mask=rmask, other=-1)[:, None]
        logp = z - lse
        p = tl.exp(logp)
        dz = tl.where(cols[None, :] == tgt, g, 0.0) - p * (g + e * (logp + ent))
        dz_ptr = DZ + rows.to(tl.int64)[:, None] * stride_dz + local[None, :]
        tl.store(dz_ptr, dz * inv_temp, mask=rmask[:, None] & (cols < v_end)[None, :])

    def _blocks(device):
        # (BLOCK_N, BLOCK_V, BLOCK_C, num_warps). On CPU small tiles, so that tests cover many tiles.
        return (64, 128, 64, 8) if device.type == "cuda" else (16, 64, 32, 1)

    class _LogprobsTriton(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, temperature):
            h = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
            w = weight if weight.stride(-1) == 1 else weight.contiguous()
            y = targets.contiguous()
            (N, C), V = h.shape, w.shape[0]
            BN, BV, BC, warps = _blocks(h.device)
            dt = dot_dtype(h)
            prec = "ieee" if dt == tl.float32 else "tf32"  # fp32 logits in full precision, as torch's matmul
            stages = 3 if dt != tl.float32 else 2
            # Split the vocab so that the grid has ~4 programs per SM even for short batches.
            tiles, token_blocks = triton.cdiv(V, BV), triton.cdiv(N, BN)
            splits = max(1, min(tiles, triton.cdiv(4 * num_programs(h.device), token_blocks)))
            tiles_per_split = triton.cdiv(tiles, splits)
            splits = triton.cdiv(tiles, tiles_per_split)
            part = torch.empty((4, splits, N), dtype=torch.float32, device=h.device)
            _logprobs_fwd_kernel[(token_blocks, splits)](
                h, w, y, part, N, V, C, tiles_per_split, h.stride(0), w.stride(0), 1.0 / temperature,
                BLOCK_N=BN, BLOCK_V=BV, BLOCK_C=BC, DOT_DTYPE=dt, PREC=prec, num_warps=warps, num_stages=stages)
            m, s, u, zy = part.unbind(0)  # each (S, N)
            m_all = m.amax(0)
            alpha = (m - m_all).exp()
            s_all = (alpha * s).sum(0)
            u_all = (alpha * (u + s * (m - m_all))).sum(0)
            lse = m_all + s_all.log()
            ent = s_all.log() - u_all / s_all
            logp = zy.sum(0) - lse
            ctx.save_for_backward(h, w, y, lse, ent)
            ctx.temperature = temperature
            return logp, ent

        @staticmethod
        def backward(ctx, dlogp, dent):
            h, w, y, lse, ent = ctx.saved_tensors
            need_h, need_w = ctx.needs_input_grad[:2]
            (N, C), V = h.shape, w.shape[0]
            BN, BV, BC, warps = _blocks(h.device)
            dt = dot_dtype(h)
            prec = "ieee" if dt == tl.float32 else "tf32"
            stages = 3 if dt != tl.float32 else 2
            dlogp, dent = dlogp.float().contiguous(), dent.float().contiguous()
            # dz for one vocab slice at a time, (N, slice): ~1/16 of the vocab, at most 2**27 elements.
            width = max(BV, min(triton.cdiv(V, 16), (1 << 27) // max(N, 1)))
            width = triton.cdiv(width, BV) * BV
            # The interpreter writes bf16 by truncation: keep dz in fp32 there, in the matmul dtype on a GPU.
            dz_dtype = w.dtype if h.is_cuda else torch.float32
            dh = torch.zeros((N, C), dtype=torch.float32, device=h.device) if need_h else None
            dw = torch.empty_like(w) if need_w else None
            h_mm = h.to(w.dtype) if need_w else None
            for v0 in range(0, V, width):
                v1 = min(V, v0 + width)
                dz = torch.empty((N, v1 - v0), dtype=dz_dtype, device=h.device)
                _logprobs_dz_kernel[(triton.cdiv(N, BN), triton.cdiv(v1 - v0, BV))](
                    h, w, y, lse, ent, dlogp, dent, dz, N, v0, v1, C, h.stride(0), w.stride(0), dz.stride(0),
                    1.0 / ctx.temperature, BLOCK_N=BN, BLOCK_V=BV, BLOCK_C=BC, DOT_DTYPE=dt, PREC=prec,
                    num_warps=warps, num_stages=stages)
                dz = dz.to(w.dtype)
                if need_h:
                    _acc_mm(dh, dz, w[v0:v1])  # (N, v) @ (v, C)
                if need_w:
                    torch.mm(dz.t(), h_mm, out=dw[v0:v1])  # (v, N) @ (N, C): one matmul over all tokens
            return dh.to(h.dtype) if need_h else None, dw, None, None

    def token_logprobs_triton(hidden, weight, targets, temperature: float = 1.0):
        """Same signature and result as `token_logprobs_ref` (without the chunk sizes); fused Triton kernels,
        forward and backward of both outputs."""
        return _LogprobsTriton.apply(hidden, weight, targets, float(temperature))
