"""The `psyche` command: the tools around training (training itself is `python train.py`)."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """psyche: Psyche-R1 in plain PyTorch. Tools for models, evaluation, data and analysis."""


@main.command("init-model")
@click.option("--preset", "preset_name", default="tiny", show_default=True, help="Model shape preset.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
@click.option("--seed", default=0, show_default=True)
@click.option("--tokenizer-vocab", default=1024, show_default=True, help="BPE vocabulary size to train.")
def init_model(preset_name, out, seed, tokenizer_vocab):
    """Write a random checkpoint (config.json, safetensors, tokenizer) with a small trained BPE tokenizer."""
    from psyche.config import ModelConfig
    from psyche.weights import init_checkpoint

    path = init_checkpoint(out, preset_name, seed=seed, tokenizer_vocab=tokenizer_vocab)
    cfg = ModelConfig.from_dir(path)
    click.echo(f"wrote {path}: {cfg.num_params():,} parameters, vocab {cfg.vocab_size}")


if __name__ == "__main__":
    main()
