"""Per-token log-probs and entropy through the lm_head without holding (N, V) fp32 logits.

`token_logprobs_ref` walks the tokens in chunks; each chunk's logits are made, reduced to (log-prob of the
target, entropy) and dropped. Under autograd every chunk is recomputed in backward (activation
checkpointing per chunk), so peak memory is one chunk's logits, not all of them.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_stats(h, weight, targets, temperature):
    logits = (h @ weight.t()).float()  # (n, V) fp32 for a stable log-softmax
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)  # (n,)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    p = torch.softmax(logits, dim=-1)
    entropy = logz - (p * logits).sum(-1)  # H = logZ - E_p[z]
    return logp, entropy


def token_logprobs_ref(hidden, weight, targets, temperature: float = 1.0, chunk_size: int = 1024):
    """hidden (N, C), weight (V, C), targets (N,) -> (logp (N,), entropy (N,)), both fp32.

    logp[i] = log softmax(hidden[i] @ weight.T / temperature)[targets[i]]; entropy of the same distribution.
    Differentiable w.r.t. hidden and weight through both outputs.
    """
    outs = []
    for s in range(0, hidden.shape[0], chunk_size):
        args = (hidden[s:s + chunk_size], weight, targets[s:s + chunk_size], temperature)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            outs.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        else:
            outs.append(_chunk_stats(*args))
    if not outs:
        z = hidden.new_zeros(0, dtype=torch.float32)
        return z, z
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def token_logprobs_naive(hidden, weight, targets, temperature: float = 1.0):
    """The obvious way, for tests and benchmarks: full (N, V) fp32 logits."""
    logits = (hidden @ weight.t()).float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)
