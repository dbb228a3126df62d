"""`psyche chat MODEL_DIR`: multi-turn chat in the terminal, streaming, through the KV-cache sampler.

Commands: /reset (forget the dialogue), /system TEXT (set the system prompt and reset), /exit.
Works on piped stdin too: each line is one user turn.
The oldest turns are forgotten when the dialogue outgrows the context (less --max-new-tokens, kept for the
reply); a message too long to fit even alone is not sent (one line on stderr says so) and the session goes on.
"""

from __future__ import annotations

import sys

import click

from psyche.pceb import PSYCHE_SYSTEM, PSYCHE_TEMPERATURE, PSYCHE_TOP_P, PSYCHE_USER_PREFIX


class Streamer:
    """Turns sampled token ids into text as they arrive; `<think>...</think>` is shown dimmed on a terminal."""

    def __init__(self, tokenizer, out, color: bool):
        self.tok, self.out, self.color = tokenizer, out, color
        self.ids, self.shown, self.in_think = [], 0, False

    def __call__(self, step, rows, tokens):
        self.ids.append(int(tokens[0]))
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return
        self._write(text[self.shown:])
        self.shown = len(text)

    def _write(self, s):
        while s:
            tag = "</think>" if self.in_think else "<think>"
            i = s.find(tag)
            part, s = (s, "") if i < 0 else (s[: i + len(tag)], s[i + len(tag):])
            if self.color and (self.in_think or part.startswith("<think>")):
                part = click.style(part, dim=True, italic=True)
            self.out.write(part)
            if i >= 0:
                self.in_think = not self.in_think
        self.out.flush()


def trim_history(tok, messages, system, budget):
    """Drop the oldest user/assistant pairs until the prompt fits `budget` tokens -> (prompt ids, messages kept).
    The newest message is never dropped, so its prompt alone may still be over budget: the caller checks."""
    msgs = list(messages)
    while True:
        ids, _ = tok.encode_chat(([{"role": "system", "content": system}] if system else []) + msgs,
                                 add_generation_prompt=True)
        if len(ids) <= budget or len(msgs) <= 1:
            return ids, msgs
        msgs = msgs[2:]


@click.command("chat")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--preset", type=click.Choice(["psyche", "plain"]), default="psyche", show_default=True,
              help="psyche: the Psyche-R1 system prompt and user-turn prefix; plain: the tokenizer's default.")
@click.option("--system", default=None, help="System prompt (overrides the preset's).")
@click.option("--temperature", default=PSYCHE_TEMPERATURE, show_default=True, type=click.FloatRange(min=0),
              help="0 = greedy.")
@click.option("--top-p", default=PSYCHE_TOP_P, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 = off.")
@click.option("--max-new-tokens", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Most tokens per reply (less than the model's context).")
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available)")
def chat(model_dir, preset, system, temperature, top_p, top_k, max_new_tokens, seed, dtype, device):
    """Chat with a checkpoint in the terminal."""
    import torch

    from psyche.config import SamplingError, SamplingParams
    from psyche.sampler import generate
    from psyche.tokenizer import Tokenizer
    from psyche.weights import load_pretrained

    try:
        sampling = SamplingParams(temperature, top_p, top_k)
    except SamplingError as e:  # e.g. a temperature too small to divide the logits by
        raise click.BadParameter(str(e), param_hint="--" + e.key.replace("_", "-")) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_pretrained(model_dir, dtype=getattr(torch, dtype) if dtype else None, device=device)
    if max_new_tokens >= cfg.max_position_embeddings:
        raise click.BadParameter(f"{max_new_tokens} leaves no room for the prompt in this model's context "
                                 f"({cfg.max_position_embeddings} tokens)", param_hint="--max-new-tokens")
    tok = Tokenizer.from_dir(model_dir)
    prefix = PSYCHE_USER_PREFIX if preset == "psyche" else ""
    system = system if system is not None else (PSYCHE_SYSTEM if preset == "psyche" else tok.default_system)
    interactive = sys.stdin.isatty()
    out = sys.stdout
    color = out.isatty()
    messages, turn = [], 0
    if interactive:
        click.echo("psyche chat: /reset, /system TEXT, /exit", err=True)
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and line == "":
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = []
            click.echo("[dialogue reset]", err=True)
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            messages = []
            click.echo("[system prompt set; dialogue reset]", err=True)
            continue
        messages.append({"role": "user", "content": prefix + line})
        budget = cfg.max_position_embeddings - max_new_tokens
        ids, kept = trim_history(tok, messages, system, budget)
        if len(ids) > budget:  # the message alone is too long: it is dropped, the dialogue before it stays
            messages.pop()
            click.echo(f"[message not sent: it makes a {len(ids)}-token prompt, and the context "
                       f"({cfg.max_position_embeddings} tokens) keeps {max_new_tokens} for the reply, so at most "
                       f"{budget} fit; shorten it or lower --max-new-tokens]", err=True)
            continue
        messages = kept
        streamer = Streamer(tok, out, color)
        out.write("assistant> " if interactive else "")
        r = generate(model, [ids], max_new_tokens=max_new_tokens, sampling=sampling, stop_token_ids=tok.stop_ids,
                     seed=seed + turn, pad_id=tok.pad_id, on_token=streamer)
        reply = tok.decode(r.tokens[0, : r.lengths[0]].tolist(), skip_special_tokens=True)
        out.write("\n" if r.finished[0] else " [truncated]\n")
        out.flush()
        messages.append({"role": "assistant", "content": reply})
        turn += 1
