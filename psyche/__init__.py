"""psyche: the Psyche-R1 recipe (Qwen2.5, SFT, GRPO, PCEB) in plain PyTorch."""

__version__ = "0.1.0"
