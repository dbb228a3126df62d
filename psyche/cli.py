"""The `psyche` command: the tools around training (training itself is `python train.py`).

Subcommands live beside the code they drive and are imported only when invoked, so `psyche --help` stays
fast and a missing optional dependency only affects its own command.

Errors: the project's own errors (bad input, a failed run; see `user_errors`) end every command, and
`python train.py`, with one line `Error: ...` on stderr and exit status 1; a traceback means a bug. `--debug`
(or PSYCHE_DEBUG=1) keeps the traceback of every error.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time

import click

DEBUG_ENV = "PSYCHE_DEBUG"


# The errors that are the input's fault or the environment's, not the code's, by module.
USER_ERRORS = (("psyche.model_config", "ConfigError"), ("psyche.data", "DataError"),
               ("psyche.hf_checkpoint", "CheckpointError"), ("psyche.tokenizer", "TokenizerError"),
               ("psyche.run", "NonFiniteLossError"), ("psyche.lora", "LoRAError"),
               ("psyche.rewards", "RewardError"), ("psyche.pceb", "BenchmarkError"),
               ("psyche.pipeline.io", "PipelineError"))


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors reported as one line: the project's own (those of the modules already imported: an error can
    only come from a module that was loaded, and a config error then costs no torch import), a non-finite
    value, and OSError (missing files, permissions, a full disk)."""
    import sys

    own = tuple(getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules)
    return own + (FloatingPointError, OSError)


def one_line(e: BaseException) -> str:
    """The error's message on one line (an OSError as `path: reason`)."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def debugging(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextlib.contextmanager
def reported(debug: bool = False):
    """Turn the project's own errors raised inside into `Error: <one line>` and exit status 1 (unless debugging).

    Under torchrun the line also goes into this rank's error file, so the launcher's failure summary shows it
    rather than a traceback; a ConfigError (raised alike on every rank, before any process group) is printed
    by rank 0 only."""
    try:
        yield
    except Exception as e:
        if debugging(debug) or not isinstance(e, user_errors()):
            raise
        line = one_line(e)
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file:
            with contextlib.suppress(OSError):
                with open(error_file, "w") as f:
                    json.dump({"message": line, "timestamp": int(time.time())}, f)
        from psyche.config import ConfigError

        if isinstance(e, ConfigError) and os.environ.get("RANK", "0") != "0":
            raise click.exceptions.Exit(1) from None
        raise click.ClickException(line) from None

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
    "variants": "psyche.cli:variants",
    "lab": "psyche.lab:lab_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(name for name in COMMANDS if self._find(name) is not None)

    def get_command(self, ctx, name):
        return self._find(name)

    def invoke(self, ctx):
        with reported(ctx.params.get("debug", False)):
            return super().invoke(ctx)

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
@click.option("--debug", is_flag=True, help=f"Show the traceback of every error (also: {DEBUG_ENV}=1).")
def main(debug):
    """psyche: Psyche-R1 in plain PyTorch. Tools for models, evaluation, data and analysis."""


@click.command("init-model")
@click.option("--preset", "preset_name", default="tiny", show_default=True, help="Model shape preset.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
@click.option("--seed", default=0, show_default=True)
@click.option("--tokenizer-vocab", default=1024, show_default=True, help="BPE vocabulary size to train.")
def init_model(preset_name, out, seed, tokenizer_vocab):
    """Write a random checkpoint (config.json, safetensors, tokenizer) with a small trained BPE tokenizer."""
    from psyche.model_config import ModelConfig
    from psyche.weights import init_checkpoint

    path = init_checkpoint(out, preset_name, seed=seed, tokenizer_vocab=tokenizer_vocab)
    cfg = ModelConfig.from_dir(path)
    click.echo(f"wrote {path}: {cfg.num_params():,} parameters, vocab {cfg.vocab_size}")


def variants_table() -> str:
    """The README's table of every registered GRPO variant (psyche/grpo/loss.py REGISTRIES), defaults marked."""
    from psyche.config import GRPOSection
    from psyche.grpo.loss import NONE_FIRST, REGISTRIES

    rows = ["| key | value | what it is |", "|---|---|---|"]
    for key, reg in REGISTRIES.items():
        default = getattr(GRPOSection(), key)
        if key in NONE_FIRST:
            rows.append(f"| `grpo.{key}` | `none`{' (default)' if default == 'none' else ''} | off |")
        for name, entry in reg.items():
            rows.append(f"| `grpo.{key}` | `{name}`{' (default)' if name == default else ''} | {entry.summary} |")
    return "\n".join(rows)


@click.command("variants")
def variants():
    """Print the table of every registered GRPO variant (estimators, policy losses, aggregations, KL kinds,
    rollout corrections): the README's table is this output."""
    click.echo(variants_table())


if __name__ == "__main__":
    main()
