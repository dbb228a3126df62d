"""`psyche eval` (generate with a model, then score) and `psyche score` (score predictions from any system).

    psyche eval --model CKPT --bench pceb --data ../shared/data/pceb --limit 5 --out runs/eval/tiny
    psyche score --bench pceb --data ../shared/data/pceb runs/eval/a/predictions.jsonl runs/eval/b/predictions.jsonl

A predictions file is JSONL with at least `id` and `response` per line (ids as documented in psyche.pceb).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

BENCHES = ("pceb", "cpsyexam")


def _load(bench: str, data: str, split: str):
    from psyche.evaluate import load_cpsyexam, load_pceb

    return load_pceb(data) if bench == "pceb" else load_cpsyexam(data, split=split)


def _report(bench: str, items, responses) -> dict:
    from psyche.evaluate import score_cpsyexam, score_predictions

    return score_predictions(items, responses) if bench == "pceb" else score_cpsyexam(items, responses)


def _markdown(bench: str, rows: dict) -> str:
    from psyche.evaluate import cpsyexam_markdown, report_markdown

    return report_markdown(rows) if bench == "pceb" else cpsyexam_markdown(rows)


def _write_json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _model_name(path: Path) -> str:
    """A row name for a predictions file: its stem, or its folder's name for a plain predictions.jsonl."""
    return path.parent.name if path.stem == "predictions" and path.parent.name else path.stem


def _bench_options(f):
    f = click.option("--split", default="dev", show_default=True, type=click.Choice(["dev", "test"]),
                     help="CPsyExam split (test has no answers: predictions go to its leaderboard file).")(f)
    f = click.option("--data", required=True, type=click.Path(exists=True),
                     help="PCEB folder (holding benchmark/) or CPsyExam zip / folder.")(f)
    f = click.option("--bench", default="pceb", show_default=True, type=click.Choice(BENCHES))(f)
    return f


@click.command("eval")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Checkpoint directory (config.json, safetensors, tokenizer).")
@_bench_options
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N items of each category and type.")
@click.option("--prompt", "style", default="psyche", show_default=True, type=click.Choice(["psyche", "pceb"]),
              help="Psyche-R1's chat prompt, or the exam-style prompt.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--max-new-tokens", default=1024, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default=None, help="Default: cuda if available, else cpu.")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Default: the checkpoint's.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output folder. Default: eval/<model folder>-<bench>.")
def eval_cmd(model_dir, bench, data, split, limit, style, batch_size, max_new_tokens, temperature, top_p, seed,
             device, dtype, out):
    """Generate answers with a model and score them: writes predictions.jsonl and report.json / report.md
    (CPsyExam test split: submission.json, the file its leaderboard takes)."""
    import torch

    from psyche.evaluate import (BenchmarkError, build_prompt, cpsyexam_submission, generate_responses,
                                 limit_items, prediction_record)
    from psyche.tokenizer import Tokenizer
    from psyche.weights import load_pretrained

    try:
        items = limit_items(_load(bench, data, split), limit)
    except BenchmarkError as e:
        raise click.ClickException(str(e)) from None
    from psyche.config import SamplingError, SamplingParams

    try:  # the sampling settings, before the model loads
        SamplingParams(temperature=temperature, top_p=top_p)
    except SamplingError as e:
        raise click.BadParameter(str(e), param_hint=f"--{e.key.replace('_', '-')}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_pretrained(model_dir, dtype=getattr(torch, dtype) if dtype else None, device=device)
    model.eval()
    tok = Tokenizer.from_dir(model_dir)
    click.echo(f"eval {bench}: {len(items)} items, prompt {style}, {device}", err=True)
    responses = generate_responses(model, tok, items, style=style, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                   log=lambda m: click.echo(m, err=True))

    out = Path(out or Path("eval") / f"{Path(model_dir).resolve().name}-{bench}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for it in items:
            rec = prediction_record(it, build_prompt(it, style), responses[it.id])
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    if bench == "cpsyexam" and split == "test":
        _write_json(out / "submission.json", cpsyexam_submission(items, responses))
        click.echo(f"wrote {out / 'predictions.jsonl'} and {out / 'submission.json'}")
        return
    report = _report(bench, items, responses)
    _write_json(out / "report.json", report)
    table = _markdown(bench, {Path(model_dir).resolve().name: report})
    (out / "report.md").write_text(table, encoding="utf-8")
    click.echo(table)
    click.echo(f"wrote {out / 'predictions.jsonl'}, {out / 'report.json'}, {out / 'report.md'}")


@click.command("score")
@_bench_options
@click.argument("predictions", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
              help="Write the JSON report (one file: the report; several: {model: report}).")
@click.option("--submission", default=None, type=click.Path(dir_okay=False),
              help="CPsyExam: write the leaderboard file (zero-shot) of the first predictions file.")
def score_cmd(bench, data, split, predictions, json_out, submission):
    """Score predictions JSONL files (lines with `id` and `response`) exactly as `psyche eval` does, and print
    one table with a row per file."""
    from psyche.evaluate import BenchmarkError, cpsyexam_submission, read_predictions

    try:
        items = _load(bench, data, split)
        by_name = {}
        for p in predictions:
            name = _model_name(Path(p))
            while name in by_name:
                name += "'"
            by_name[name] = read_predictions(p, items)
    except BenchmarkError as e:
        raise click.ClickException(str(e)) from None

    if submission:
        if bench != "cpsyexam":
            raise click.UsageError("--submission is for --bench cpsyexam")
        _write_json(Path(submission), cpsyexam_submission(items, next(iter(by_name.values()))))
        click.echo(f"wrote {submission}", err=True)
    if bench == "cpsyexam" and split == "test":
        return  # no answers to score against
    rows = {}
    for name, responses in by_name.items():
        rows[name] = _report(bench, items, responses)
        absent = len([it for it in items if it.id not in responses])
        if absent:
            click.echo(f"warning: {name}: {absent} of {len(items)} items have no prediction (not scored)", err=True)
    click.echo(_markdown(bench, rows))
    if json_out:
        _write_json(Path(json_out), next(iter(rows.values())) if len(rows) == 1 else rows)
