"""psyche training entry point: `python train.py --stage sft|select|grpo|eval|all`.

With no --config, every stage belongs to the embedded default (psyche/recipe.py): the whole Psyche-R1 recipe in
miniature, `all` by default; a stage whose inputs are missing runs the stages before it first. With --config,
`--stage sft` and `--stage grpo` train on the config's data (psyche/sft.py, psyche/grpo/loop.py), also under
torchrun.
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
@click.option("--debug", is_flag=True, help="Show the traceback of every error (also: PSYCHE_DEBUG=1).")
def main(stage, config_path, overrides, out, sweeps, seeds, print_commands, nproc, debug):
    """Train and evaluate Psyche-R1 style models.

    Bad input (config, data, checkpoint, tokenizer) and a failed run (non-finite loss or reward, a checkpoint
    that cannot be written) end with one line `Error: ...` and exit status 1; a traceback means a bug."""
    from psyche.cli import reported

    with reported(debug):
        if sweeps or seeds:  # a grid of runs of one stage, each in its own directory
            from psyche.sweep import sweep_main

            return sweep_main(stage, config_path, overrides, out, sweeps, seeds, print_commands, nproc)
        sets = list(overrides) + ([f"run.out={_toml_str(out)}"] if out else [])
        if config_path is not None:
            if stage not in ("sft", "grpo"):
                raise click.UsageError(f"--config works with --stage sft or --stage grpo, not --stage {stage} "
                                       "(without --config every stage belongs to the embedded default)")
            return _train(stage, config_path, sets)
        _embedded(stage, sets)


def _train(stage: str, config_path: str, sets: list[str]):
    """One stage on the config's data, alone or under torchrun (run_sft / run_grpo check the whole config first)."""
    import os

    from psyche.config import load_run_config

    cfg = load_run_config(config_path, sets)
    if stage == "sft":
        from psyche.sft import run_sft as run
    else:
        from psyche.grpo.loop import run_grpo as run
    if "TORCHELASTIC_RUN_ID" in os.environ:
        from torch.distributed.elastic.multiprocessing.errors import record

        run = record(run)  # a bug's traceback goes into the launcher's failure summary
    run(cfg)


def _embedded(stage: str, sets: list[str]):
    """The embedded default (psyche/recipe.py); its SFT and GRPO settings are checked before any stage runs."""
    from psyche import recipe
    from psyche.config import ConfigError, load_run_config
    from psyche.validate import check_settings

    cfg = load_run_config(None, sets, cls=recipe.embedded_config)
    try:  # the model both stages take their shapes from
        base = recipe.base_dir(cfg)
    except ConfigError:
        base = None  # the recipe's own check names what is missing
    check_settings(cfg, base=base)
    recipe.run_recipe(cfg, stage, log=click.echo)


def _toml_str(s: str) -> str:
    import json

    return json.dumps(s)  # a quoted TOML string, whatever the path holds


if __name__ == "__main__":
    main()
