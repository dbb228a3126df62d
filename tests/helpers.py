"""Shared helpers for tests: tiny configs and their transformers twins."""

from __future__ import annotations

import torch

from psyche.model_config import ModelConfig


def tiny_config(tied=True, n_head=4, n_kv=2, head_dim=16, layers=2, vocab=96, **kw) -> ModelConfig:
    return ModelConfig(hidden_size=n_head * head_dim, intermediate_size=3 * n_head * head_dim, num_hidden_layers=layers,
                       num_attention_heads=n_head, num_key_value_heads=n_kv, vocab_size=vocab, tie_word_embeddings=tied,
                       max_position_embeddings=256, torch_dtype="float32", **kw)


def hf_model(cfg: ModelConfig, seed=0, dtype=torch.float32):
    """A randomly initialised transformers Qwen2ForCausalLM with the same shapes."""
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "torch_dtype"})
    hf_cfg._attn_implementation = "eager"
    m = transformers.Qwen2ForCausalLM(hf_cfg).to(dtype).eval()
    # HF initialises biases to zero; random biases make the parity test see them.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def psyche_from_hf(hf, cfg: ModelConfig, dtype=torch.float32):
    from psyche.model import Qwen2

    with torch.device("meta"):
        m = Qwen2(cfg)
    sd = {k: v.detach().clone().to(dtype) for k, v in hf.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    m.load_state_dict(sd, strict=True, assign=True)
    m.tie_weights()
    return m.eval()


def left_padded(prompts):
    """Prompts as transformers' batched generate wants them: (ids, attention_mask), both (B, T), left-padded."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], att[i, T - len(p):] = torch.tensor(p), 1
    return ids, att
