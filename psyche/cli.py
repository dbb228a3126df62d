"""The `psyche` command: the tools around training (training itself is `python train.py`).

Subcommands live beside the code they drive and are imported only when invoked, so `psyche --help` stays
fast and a missing optional dependency only affects its own command.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click command
COMMANDS = {
    "init-model": "psyche.cli:init_model",
    "chat": "psyche.chat:chat",
    "eval": "psyche.evaluate_cli:eval_cmd",
    "score": "psyche.evaluate_cli:score_cmd",
    "serve": "psyche.serve:serve",
    "data": "psyche.pipeline.cli:data",
    "plot": "psyche.analysis:plot_cmd",
    "compare": "psyche.analysis:compare_cmd",
    "replay": "psyche.analysis:replay_cmd",
    "task-eval": "psyche.recipe:task_eval_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(name for name in COMMANDS if self._find(name) is not None)

    def get_command(self, ctx, name):
        return self._find(name)

    @staticmethod
    def _find(name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name and (e.name == module or module.startswith(e.name + ".")):
                return None  # that tool is not part of this build yet
            raise


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """psyche: Psyche-R1 in plain PyTorch. Tools for models, evaluation, data and analysis."""


@click.command("init-model")
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
