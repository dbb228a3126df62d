"""psyche training entry point: `python train.py --stage sft|select|grpo|eval|all`.

Stages arrive one issue at a time; with no stage given, the main job runs on the embedded default.
"""

from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--stage", type=click.Choice(["all", "sft", "select", "grpo", "eval"]), default="all", show_default=True,
              help="Which part of the recipe to run.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="Run config (TOML).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config value.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory.")
@click.option("--sweep", "sweeps", multiple=True, metavar="SECTION.KEY=V1,V2,...",
              help="Sweep a value over a list (repeat for a grid); sft/grpo only, see psyche/sweep.py.")
@click.option("--seeds", default=None, metavar="N|S1,S2,...", help="Run each sweep cell with N seeds (or these).")
@click.option("--print-commands", is_flag=True, help="With --sweep/--seeds: print torchrun commands, run nothing.")
@click.option("--nproc", default=1, show_default=True, help="Processes per torchrun command (--print-commands).")
def main(stage, config_path, overrides, out, sweeps, seeds, print_commands, nproc):
    """Train and evaluate Psyche-R1 style models."""
    if sweeps or seeds:  # a grid of runs of one stage, each in its own directory
        from psyche.sweep import sweep_main

        return sweep_main(stage, config_path, overrides, out, sweeps, seeds, print_commands, nproc)
    if stage in ("sft", "grpo"):
        import os

        from torch.distributed.elastic.multiprocessing.errors import record

        from psyche.config import ConfigError, load_run_config
        from psyche.data import DataError
        from psyche.sft import NonFiniteLossError

        if stage == "sft":
            from psyche.sft import run_sft as run
        else:
            from psyche.grpo_run import run_grpo as run
        try:
            cfg = load_run_config(config_path, list(overrides) + ([f"run.out={_toml_str(out)}"] if out else []))
            # under torchrun, `record` puts this rank's traceback into the launcher's failure summary
            (record(run) if "TORCHELASTIC_RUN_ID" in os.environ else run)(cfg)
        except (ConfigError, DataError, NonFiniteLossError, FloatingPointError) as e:
            raise click.ClickException(str(e)) from None
        return

    import tempfile
    from pathlib import Path

    import torch

    from psyche.weights import init_checkpoint, load_pretrained
    from psyche.tokenizer import Tokenizer

    out = Path(out or tempfile.mkdtemp(prefix="psyche-"))
    ckpt = init_checkpoint(out / "init", "tiny", seed=0)
    model, cfg = load_pretrained(ckpt)
    tok = Tokenizer.from_dir(ckpt)
    click.echo(f"tiny model: {cfg.num_params():,} parameters at {ckpt}")
    ids = torch.tensor([tok.encode(tok.render_chat([{"role": "user", "content": "你好"}], True))])
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    click.echo(f"greedy sanity check: {ids.shape[1]} tokens, finite logits; decoded tail {tok.decode(ids[0, -8:])!r}")


def _toml_str(s: str) -> str:
    import json

    return json.dumps(s)  # a quoted TOML string, whatever the path holds


if __name__ == "__main__":
    main()
