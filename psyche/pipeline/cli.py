"""`psyche data ...`: the pipeline steps as commands. Each reads JSONL, writes JSONL plus a log, resumes where
it stopped (see io.py), shows a progress bar and ends with a summary of what was kept and dropped, and why.

Backends are given as specs: `local:CKPT_DIR` (a psyche checkpoint in this process) or `MODEL@URL` (an
OpenAI-compatible endpoint such as `psyche serve`: `tiny@http://127.0.0.1:8000/v1`).
"""

from __future__ import annotations

import functools

import click

from psyche.pipeline.io import Journal, PipelineError, read_records
from psyche.pipeline.prompts import LANGS


def _backend_opts(f):
    opts = [
        click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True,
                     help="Environment variable with the API key (HTTP backends)."),
        click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                     help="HTTP timeout per read, seconds."),
        click.option("--retries", default=3, show_default=True, type=click.IntRange(min=0),
                     help="HTTP retries after the first attempt."),
        click.option("--backoff", default=1.0, show_default=True, type=click.FloatRange(min=0),
                     help="First retry delay, seconds; doubles."),
        click.option("--concurrency", default=8, show_default=True, type=click.IntRange(min=1),
                     help="HTTP requests in flight."),
        click.option("--device", default=None, help="Local backends: cpu or cuda (default: cuda if available)."),
        click.option("--dtype", default=None, help="Local backends: float32, bfloat16, ..."),
        click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(0, 2)),
        click.option("--top-p", default=0.9, show_default=True, type=click.FloatRange(0, 1, min_open=True)),
        click.option("--max-tokens", default=1024, show_default=True, type=click.IntRange(min=1),
                     help="Most tokens per reply."),
        click.option("--seed", default=0, show_default=True, help="Base seed; each request's seed derives from it."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _step_opts(f):
    opts = [
        click.option("--log", "log_path", default=None, type=click.Path(dir_okay=False),
                     help="The step's log (default: OUT with .log.jsonl)."),
        click.option("--overwrite", is_flag=True, help="Start again: delete the outputs and the log first."),
        click.option("--limit", default=None, type=click.IntRange(min=0),
                     help="Process at most this many new items."),
        click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
                     help="Items per batch (and per commit)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _errors(f):
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except PipelineError as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def _backend(spec, o):
    from psyche.pipeline.backends import from_spec

    try:
        return from_spec(spec, api_key_env=o["api_key_env"], timeout=o["timeout"], max_retries=o["retries"],
                         backoff=o["backoff"], concurrency=o["concurrency"], batch_size=o["batch_size"],
                         device=o["device"], dtype=o["dtype"])
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _sampling(o):
    return dict(temperature=o["temperature"], top_p=o["top_p"], max_tokens=o["max_tokens"], seed=o["seed"])


def _run(journal, call):
    with journal:
        summary = call()
    click.echo(summary.line(), err=True)
    outs = ", ".join(str(p) for p in journal.paths.values())
    click.echo(f"outputs: {outs}; log: {journal.log_path}", err=True)
    return summary


@click.group("data")
def data():
    """The Psyche-R1 data pipeline: clean -> questions -> rationales; empathy; select."""


@data.command("clean")
@click.argument("inp", metavar="IN", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--field", default="text", show_default=True, help="The record field holding the text.")
@click.option("--min-chars", default=20, show_default=True, type=click.IntRange(min=0),
              help="Drop texts shorter than this after cleaning.")
@click.option("--threshold", default=0.8, show_default=True, type=click.FloatRange(0, 1),
              help="Near-duplicate Jaccard threshold (MinHash-LSH).")
@click.option("--num-perm", default=128, show_default=True, type=click.IntRange(min=1), help="MinHash permutations.")
@click.option("--ngram", default=5, show_default=True, type=click.IntRange(min=1),
              help="Character n-gram size of the shingles.")
@_step_opts
@_errors
def clean_cmd(inp, out, field, min_chars, threshold, num_perm, ngram, log_path, overwrite, limit, batch_size, quiet):
    """Strip emoji, ads and links, normalise punctuation, drop near-duplicates: IN -> OUT (JSONL)."""
    from psyche.pipeline.clean import clean_records

    records = read_records(inp)  # the whole input is parsed before anything is written
    j = Journal({"out": out}, log_path, overwrite)
    _run(j, lambda: clean_records(records, j, field=field, min_chars=min_chars, threshold=threshold,
                                  num_perm=num_perm, ngram=ngram, limit=limit, progress=not quiet))


@data.command("questions")
@click.argument("inp", metavar="IN", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--backend", "spec", required=True, help="Generator: local:CKPT or MODEL@URL.")
@click.option("--checker", default=None, help="Quality checker backend (default: the generator).")
@click.option("--no-check", is_flag=True, help="Skip the quality check.")
@click.option("-n", "--per-passage", default=3, show_default=True, type=click.IntRange(min=1),
              help="Questions asked for per passage.")
@click.option("--field", default="text", show_default=True, help="The record field holding the passage.")
@click.option("--threshold", default=0.8, show_default=True, type=click.FloatRange(0, 1),
              help="Near-duplicate Jaccard threshold.")
@click.option("--lang", type=click.Choice(LANGS), default="zh", show_default=True, help="Prompt language.")
@_backend_opts
@_step_opts
@_errors
def questions_cmd(inp, out, spec, checker, no_check, per_passage, field, threshold, lang, log_path, overwrite, limit,
                  batch_size, quiet, **o):
    """Generate A-D multiple-choice questions from passages: IN (JSONL with text) -> OUT (MC items)."""
    from psyche.pipeline.questions import generate_questions

    records = read_records(inp)  # the whole input is parsed before anything is written
    o["batch_size"] = batch_size
    gen = _backend(spec, o)
    chk = _backend(checker, o) if checker else None
    j = Journal({"out": out}, log_path, overwrite)
    _run(j, lambda: generate_questions(records, j, gen, checker=chk, check=not no_check, n=per_passage,
                                       lang=lang, field=field, threshold=threshold, batch_size=batch_size, limit=limit,
                                       progress=not quiet, **_sampling(o)))


@data.command("rationales")
@click.argument("inp", metavar="IN", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--backend", "spec", required=True, help="local:CKPT or MODEL@URL.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(min=0),
              help="Prompt-revision rounds (T) after the first rationale.")
@click.option("--lang", type=click.Choice(LANGS), default="zh", show_default=True, help="Prompt language.")
@_backend_opts
@_step_opts
@_errors
def rationales_cmd(inp, out, spec, rounds, lang, log_path, overwrite, limit, batch_size, quiet, **o):
    """Write verified rationales for MC items, refined over T rounds: IN -> OUT (items with analysis)."""
    from psyche.pipeline.rationales import write_rationales

    records = read_records(inp)  # the whole input is parsed before anything is written
    o["batch_size"] = batch_size
    b = _backend(spec, o)
    j = Journal({"out": out}, log_path, overwrite)
    _run(j, lambda: write_rationales(records, j, b, rounds=rounds, lang=lang, batch_size=batch_size,
                                     limit=limit, progress=not quiet, **_sampling(o)))


@data.command("empathy")
@click.argument("inp", metavar="IN", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--backend", "spec", required=True, help="local:CKPT or MODEL@URL.")
@click.option("--lang", type=click.Choice(LANGS), default="zh", show_default=True, help="Prompt language.")
@click.option("--min-chars", default=5, show_default=True, type=click.IntRange(min=0),
              help="Shortest acceptable rewritten reply.")
@click.option("--max-ratio", default=4.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Longest rewrite, as a multiple of the original.")
@_backend_opts
@_step_opts
@_errors
def empathy_cmd(inp, out, spec, lang, min_chars, max_ratio, log_path, overwrite, limit, batch_size, quiet, **o):
    """Rewrite counsellor replies empathetically: IN (dialogues) -> OUT (messages JSONL)."""
    from psyche.pipeline.empathy import rewrite_dialogues

    records = read_records(inp)  # the whole input is parsed before anything is written
    o["batch_size"] = batch_size
    b = _backend(spec, o)
    j = Journal({"out": out}, log_path, overwrite)
    _run(j, lambda: rewrite_dialogues(records, j, b, lang=lang, min_chars=min_chars, max_ratio=max_ratio,
                                      batch_size=batch_size, limit=limit, progress=not quiet, **_sampling(o)))


@data.command("select")
@click.argument("inp", metavar="IN", type=click.Path(exists=True, dir_okay=False))
@click.option("--challenge", required=True, type=click.Path(dir_okay=False),
              help="Output for items every selector got wrong (GRPO).")
@click.option("--non-challenge", "rest", required=True, type=click.Path(dir_okay=False),
              help="Output for the other items (SFT).")
@click.option("--selector", "specs", multiple=True, required=True, help="A selector backend; repeat for several.")
@click.option("-k", "--samples", default=1, show_default=True, type=click.IntRange(min=1),
              help="Answers per selector per item (pass@k).")
@click.option("--style", type=click.Choice(["psyche", "pceb"]), default="psyche", show_default=True,
              help="Question prompt: Psyche-R1's chat prompt or the exam template.")
@click.option("--no-early-stop", is_flag=True, help="Ask every selector even once one has solved the item.")
@_backend_opts
@_step_opts
@_errors
def select_cmd(inp, challenge, rest, specs, samples, style, no_early_stop, log_path, overwrite, limit, batch_size,
               quiet, **o):
    """Split MC items into challenge (every selector wrong) and non-challenge items."""
    from psyche.pipeline.select import select_step

    records = read_records(inp)  # the whole input is parsed before anything is written
    o["batch_size"] = batch_size
    selectors = [_backend(s, o) for s in specs]
    j = Journal({"challenge": challenge, "non_challenge": rest}, log_path, overwrite)
    _run(j, lambda: select_step(records, j, selectors, k=samples, style=style, early_stop=not no_early_stop,
                                batch_size=batch_size, limit=limit, progress=not quiet, **_sampling(o)))
