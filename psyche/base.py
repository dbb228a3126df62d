"""The embedded default's base model: a tiny Qwen2 pretrained on exam items of the practice scales.

Psyche-R1 starts from Qwen2.5-7B-Instruct, a model that already reads exam questions, reasons and answers by
letter. The miniature starts from this checkpoint, shipped in psyche/assets/base (safetensors, config.json,
tokenizer.json, build.json with the command, the machine and the training curve). It was trained from random
weights on items of the four practice scales of psyche/scales.py, which share the task's item format and
procedure (score three things, add, find the level, check every option, answer by letter) but use other
symptoms, phrases, cut points and thresholds. It has never seen Xu Youxin's rule: on the task it answers in the
right format with the wrong scores (the "base" row of the main job's table). The tokenizer is trained on the
practice corpus and on the task's text, so that its vocabulary covers the task's words, as a real model's
covers its language; the model never sees a task item with its answer.

    python -m psyche.base                       # rebuild psyche/assets/base (deterministic on one machine)
    python -m psyche.base --out /tmp/base --steps 300          # a quick look

A from-scratch model learns this format with a phase change (the letter step) whose timing moves with the data
order and the float rounding of the machine; pretraining once, here, keeps that phase change out of the main job.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

import click

from psyche.scales import PRACTICE_SCALES, XU
from psyche.task import item_to_sft_messages, make_splits, sft_target, skill_rates, task_prompt

BASE_DIR = Path(__file__).resolve().parent / "assets" / "base"

SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)


def corpus(seed: int, n_per_scale: int, n_eval: int, statements_share: float = 0.4) -> tuple[list, list]:
    """(train, held-out) items of every practice scale, shuffled together. In training, `statements_share` of
    each scale's items are statements (the type that needs the most practice: four lines, each compared with
    a different score), the other types share the rest equally; held out, the four types are equal."""
    import random

    from psyche.task import fact_keys, make_items

    train, held = [], []
    for scale in PRACTICE_SCALES:
        keys = fact_keys(scale, seed, 0.25)
        n_st = round(statements_share * n_per_scale)
        train += make_items(scale, seed, n_per_scale - n_st, "train", keys["train"], types=("total", "level", "score"))
        train += make_items(scale, seed, n_st, "train", keys["train"], types=("statements",))
        held += make_items(scale, seed, n_eval, "test", keys["test"])
    random.Random(f"corpus|{seed}").shuffle(train)
    return train, held


def tokenizer_texts(seed: int, n: int = 1000) -> list[str]:
    """Text for the byte-level BPE: prompts and replies of practice items and of task items (Xu Youxin), with
    <think> and </think> replaced by newlines (they become whole tokens of their own)."""
    texts = []
    for scale in (*PRACTICE_SCALES, XU):
        items, _ = make_splits(seed, n_train=n, n_test=0, scale=scale)
        for it in items:
            texts.append("user\n" + task_prompt(it)[0]["content"])
            texts.append("assistant\n" + sft_target(it).replace("<think>", "\n").replace("</think>", "\n"))
    return texts


def command(**settings) -> str:
    """The command line that rebuilds these weights: the settings that differ from the defaults (where the
    result is written to does not change it)."""
    defaults = {p.name: p.default for p in main.params if p.name in settings}
    return " ".join(["python -m psyche.base"] + [f"--{k.replace('_', '-')} {v}" for k, v in settings.items()
                                                   if v != defaults[k]])


def build(out: Path, *, steps: int, seed: int, n_per_scale: int, vocab: int, lr: float, batch: int,
          eval_every: int, work: Path, log=print) -> dict:
    """Pretrain the base model and write it to `out` (atomically); returns the build record."""
    from psyche.config import RunConfig
    from psyche.model_config import ModelConfig
    from psyche.model import build_model
    from psyche.sft import run_sft
    from psyche.tokenizer import train_tokenizer
    from psyche.weights import load_pretrained, save_pretrained

    import torch

    t0 = time.time()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    train, held = corpus(seed, n_per_scale, n_eval=50)
    with open(work / "corpus.jsonl", "w", encoding="utf-8") as f:
        for it in train:
            f.write(json.dumps({"id": it.id, "messages": item_to_sft_messages(it)}, ensure_ascii=False) + "\n")
    tok = train_tokenizer(tokenizer_texts(seed), vocab_size=vocab)
    mc = ModelConfig(**SHAPE, vocab_size=-(-tok.vocab_size // 64) * 64, tie_word_embeddings=True,
                     max_position_embeddings=512, torch_dtype="float32", eos_token_id=tok.im_end_id,
                     bos_token_id=tok.eot_id)
    save_pretrained(build_model(mc, seed=seed), work / "init", tokenizer=tok)
    xu_items = make_splits(seed, n_train=0, n_test=200)[1]

    cfg = RunConfig()
    cfg.run.seed, cfg.run.out, cfg.model.init, cfg.model.dtype = seed, str(work / "run"), str(work / "init"), "float32"
    cfg.data.paths, cfg.data.format, cfg.data.max_length, cfg.data.packing = \
        [str(work / "corpus.jsonl")], "messages", 160, False  # no system turn, as at generation
    cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.schedule, cfg.optim.min_lr_ratio = lr, 0.02, "cosine", 0.1
    cfg.sft.max_steps, cfg.sft.global_batch, cfg.sft.micro_batch = steps, batch, batch
    cfg.checkpoint.every, cfg.checkpoint.keep_last, cfg.log.every = 0, 1, 500

    curve = []

    def on_step(step, model):
        if step % eval_every == 0 or step == steps:
            rates = skill_rates(model, tok, held)
            curve.append({"step": step, **{k: round(v, 4) for k, v in rates.items()}})
            log(f"step {step}: " + " ".join(f"{k} {v:.2f}" for k, v in rates.items()))

    run_sft(cfg, on_step=on_step)
    model, _ = load_pretrained(work / "run" / "hf")
    record = {
        "command": command(steps=steps, seed=seed, n_per_scale=n_per_scale, vocab=vocab, lr=lr, batch=batch),
        "settings": {"steps": steps, "seed": seed, "n_per_scale": n_per_scale, "vocab": vocab, "lr": lr,
                     "batch": batch, **SHAPE},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "threads": torch.get_num_threads()},
        "wall_s": None,
        "parameters": mc.num_params(),
        "curve": curve,  # held-out practice items (50 per scale), greedy
        "practice_final": skill_rates(model, tok, held),
        "task_before_sft": skill_rates(model, tok, xu_items),  # Xu Youxin items: the rule is not known
    }
    record["wall_s"] = round(time.time() - t0, 1)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(work / "run" / "hf", tmp)
    (tmp / "build.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return record


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default=str(BASE_DIR), show_default=True)
@click.option("--steps", default=12000, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--n-per-scale", default=48000, show_default=True, help="Training items per practice scale.")
@click.option("--vocab", default=1536, show_default=True)
@click.option("--lr", default=3e-3, show_default=True)
@click.option("--batch", default=16, show_default=True)
@click.option("--eval-every", default=1000, show_default=True)
@click.option("--work", type=click.Path(file_okay=False), default="runs/base-build", show_default=True,
              help="Scratch run directory (corpus, initial weights, the SFT run).")
def main(out, steps, seed, n_per_scale, vocab, lr, batch, eval_every, work):
    """Pretrain the base model of the embedded default on the practice scales' exam items."""
    rec = build(Path(out), steps=steps, seed=seed, n_per_scale=n_per_scale, vocab=vocab, lr=lr, batch=batch,
                eval_every=eval_every, work=Path(work), log=click.echo)
    click.echo(f"wrote {out} in {rec['wall_s']:.0f} s; practice items: "
               + " ".join(f"{k} {v:.2f}" for k, v in rec["practice_final"].items())
               + "; task items: " + " ".join(f"{k} {v:.2f}" for k, v in rec["task_before_sft"].items()))


if __name__ == "__main__":
    main()
