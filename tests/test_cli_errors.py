"""Bad input through the real entry points: every case is a subprocess of `python train.py` or `psyche ...`.

Each case asserts exit status 1 (or 2 for a usage error), no traceback, an `Error:` line naming the culprit
(path, path:line or key), and that nothing in the workspace changed: a previous run's directory, the
checkpoints and data files the cases point at, compared byte for byte (and no file added). Config errors
also show that they come early: nothing on stdout (no resolved config, no "model:" line, so no model was
built) and under 5 s of the process's CPU time from start to exit, interpreter start-up included (CPU time,
not wall time: it does not grow when the machine is busy).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from test_evaluate import make_pceb

ROOT = Path(__file__).resolve().parents[1]
SFT_TOML = "configs/tiny-sft.toml"
GRPO_TOML = "configs/tiny-grpo.toml"
CONFIG_CPU_S = 5.0
ENV = {k: v for k, v in os.environ.items() if k not in ("PSYCHE_DEBUG", "PSYCHE_FAULT", "PSYCHE_API_KEY")}


@dataclass
class Case:
    name: str
    argv: list[str]  # after the interpreter: "train.py ..." or "-m psyche.cli ..."; {placeholders} from `ws`
    culprit: str  # must appear in the Error line ({placeholders} too)
    config: bool = False  # a config error: fast, nothing on stdout
    status: int = 1
    stdin: str = ""


def sft(*sets, out="{run}", config=SFT_TOML, stage="sft"):
    args = ["train.py", "--stage", stage, "--config", config, "--out", out, "--set", "log.progress=false"]
    return args + [a for s in sets for a in ("--set", s)]


def grpo(*sets, out="{run}"):
    return sft(*sets, out=out, config=GRPO_TOML, stage="grpo")


def embedded(*args):
    return ["train.py", "--out", "{fresh}", *args]


def psyche(*args):
    return ["-m", "psyche.cli", *args]


CASES = [
    # ---- train.py: the config file and --set ----
    Case("missing config file", sft(config="{d}/nope.toml"), "{d}/nope.toml: config file not found", True),
    Case("invalid TOML", sft(config="{d}/invalid.toml"), "{d}/invalid.toml: invalid TOML", True),
    Case("unknown key in TOML", sft(config="{d}/unknown_key.toml"), "unknown_key.toml:2: unknown key 'lrr' in optim",
         True),
    Case("unknown section in TOML", sft(config="{d}/unknown_section.toml"), "unknown section 'trainer'", True),
    Case("wrong type in TOML", sft(config="{d}/wrong_type.toml"), "wrong_type.toml:2: optim.lr: expected float", True),
    Case("--set typo", sft("sft.micro=3"), "--set sft.micro=3: unknown key 'micro' in sft", True),
    Case("--set without a value", sft("sft.micro_batch"), "--set sft.micro_batch: expected SECTION.KEY=VALUE", True),
    Case("--set a choice that does not exist", sft("data.format=xml"), "data.format: 'xml' is not one of", True),
    Case("--set a whole section", sft("sft=3"), "--set sft=3: sft is a section", True),
    Case("unknown stage", ["train.py", "--stage", "pretrain", "--out", "{fresh}"], "'--stage'", True, status=2),
    Case("--config with a recipe stage", sft(stage="eval"), "--config works with --stage sft or --stage grpo", True,
         status=2),
    # ---- train.py --stage sft: data ----
    Case("malformed JSONL", sft('data.paths=["{d}/malformed.jsonl"]'), "{d}/malformed.jsonl:2: invalid JSON"),
    Case("empty dataset", sft('data.paths=["{d}/empty.jsonl"]'), "{d}/empty.jsonl: empty dataset"),
    Case("record without an assistant turn", sft('data.paths=["{d}/no_assistant.jsonl"]'),
         "{d}/no_assistant.jsonl:1: no assistant turn"),
    Case("missing data file", sft('data.paths=["{d}/missing.jsonl"]'), "data.paths[0] = '{d}/missing.jsonl': data "
         "file not found", True),
    Case("data path is a directory", sft('data.paths=["{d}"]'), "data.paths[0] = '{d}': not a file", True),
    Case("no data files", sft("data.paths=[]"), "data.paths=[]", True),
    Case("global batch larger than the data", sft("sft.global_batch=400"), "lower sft.global_batch"),
    Case("every sample too long", sft("data.max_length=8"), "max_length=8"),
    # ---- train.py --stage sft: the model to start from ----
    Case("model.init missing directory", sft('model.init="{d}/no_such_model"'), "model.init = '{d}/no_such_model': no "
         "such directory", True),
    Case("checkpoint directory without config.json", sft('model.init="{nocfg}"'), "model.init = '{nocfg}': no "
         "config.json there", True),
    Case("truncated model.safetensors", sft('model.init="{trunc}"'), "{trunc}/model.safetensors: corrupt or truncated"),
    Case("config.json shapes do not match the tensors", sft('model.init="{shape}"'),
         "{shape}/config.json: vocab_size, hidden_size give 'model.embed_tokens.weight' the shape", True),
    # ---- a checkpoint's config.json, checked key by key before anything is built ----
    Case("config.json: no attention heads", sft('model.init="{heads0}"'),
         "{heads0}/config.json: num_attention_heads must be an integer in [1, 1024], got 0", True),
    Case("config.json: no kv heads", psyche("chat", "{kv0}"), "{kv0}/config.json: num_key_value_heads must be an "
         "integer in [1, 1024], got 0", stdin="hi\n"),
    Case("config.json: no heads beside a head_dim", psyche("serve", "{heads0hd}", "--port", "0"),
         "{heads0hd}/config.json: num_attention_heads must be an integer in [1, 1024], got 0"),
    Case("config.json: negative rope_theta", sft('model.init="{rope}"'),
         "{rope}/config.json: rope_theta must be a finite number in (0, inf), got -1", True),
    Case("config.json: rms_norm_eps as a string", psyche("eval", "--model", "{eps}", "--data", "{pceb}", "--out",
                                                         "{d}/eval_out"), "{eps}/config.json: rms_norm_eps must be"),
    Case("config.json: 1,000 layers of width 65,536", sft('model.init="{huge}"'),
         "{huge}/config.json: num_hidden_layers is 1000, but the checkpoint holds 2 layers", True),
    Case("config.json: hidden size of a million", psyche("chat", "{wide}"),
         "{wide}/config.json: hidden_size must be an integer in [1, 65536], got 1000000", stdin="hi\n"),
    Case("config.json: yarn rope scaling", psyche("chat", "{yarn}"),
         "{yarn}/config.json: rope_scaling rope_type 'yarn' is not supported", stdin="hi\n"),
    Case("config.json: integer dtype", grpo('model.init="{int8}"'), "{int8}/config.json: torch_dtype must be one of",
         True),
    Case("config.json: untied head on a tied checkpoint", sft('model.init="{untied}"'),
         "{untied}/config.json: tie_word_embeddings is false, but the checkpoint has no lm_head.weight", True),
    Case("config.json: eos beyond the vocabulary", psyche("chat", "{eos}"), "{eos}/config.json: eos_token_id must be "
         "a token id", stdin="hi\n"),
    # ---- a model whose weights are NaN (a diverged run): an error, never a reply, never a start ----
    Case("NaN weights: SFT from them", sft('model.init="{nan}"'), "{nan}: tensor 'model.norm.weight' holds NaN"),
    Case("NaN weights: GRPO from them", grpo('model.init="{nan}"', out="{d}/grpo_nan"),
         "{nan}: tensor 'model.norm.weight' holds NaN"),
    Case("NaN weights: chat", psyche("chat", "{nan}"), "the model's logits are not finite", stdin="hi\n"),
    Case("NaN weights: eval", psyche("eval", "--model", "{nan}", "--data", "{pceb}", "--out", "{d}/eval_out"),
         "the model's logits are not finite"),
    Case("infinite weights: chat", psyche("chat", "{inf}"), "the model's logits are not finite", stdin="hi\n"),
    Case("corrupt tokenizer.json", sft('model.init="{tokbad}"'), "{tokbad}/tokenizer.json: cannot be read"),
    Case("LoRA rank below 0", sft("lora.rank=-1"), "lora.rank=-1: must be >= 0", True),
    Case("LoRA target that does not exist", sft("lora.rank=4", 'lora.targets=["q_proj", "qkv"]'),
         "lora.targets=['q_proj', 'qkv']: name each of q_proj", True),
    Case("LoRA adapter of another base model", sft("lora.rank=4", "lora.alpha=8.0", 'lora.targets=["q_proj"]',
                                                   'model.init="{ckpt}"', 'lora.init="{adapter}"'),
         "{adapter}/adapter_model.safetensors: tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' "
         "has shape"),
    Case("unknown preset", sft('model.init="preset:huge"'), "model.init='preset:huge': unknown preset 'huge'", True),
    # ---- train.py --stage sft: ranges and rules between keys ----
    Case("negative learning rate", sft("optim.lr=-1"), "optim.lr=-1.0: the learning rate must be > 0", True),
    Case("NaN learning rate", sft("optim.lr=nan"), "optim.lr=nan: must be a finite number", True),
    Case("micro-batch does not divide the global batch", sft("sft.micro_batch=3"),
         "sft.global_batch=4, sft.micro_batch=3: the global batch must be a multiple of micro_batch x ranks", True),
    Case("one beta", sft("optim.betas=[0.9]"), "optim.betas=[0.9]: AdamW takes two betas", True),
    Case("max_length beyond the model's positions", sft("data.max_length=4096"),
         "data.max_length=4096: longer than the model's max_position_embeddings (2048", True),
    Case("log every 0 steps", sft("log.every=0"), "log.every=0: must be >= 1", True),
    Case("keep no checkpoint", sft("checkpoint.keep_last=0"), "checkpoint.keep_last=0: must be >= 1", True),
    Case("negative seed", sft("run.seed=-1"), "run.seed=-1: must be in [0, 2**32)", True),
    Case("nothing to train", sft("sft.epochs=0"), "sft.epochs=0.0: with sft.max_steps=0 there is nothing to train",
         True),
    # ---- train.py --stage grpo ----
    Case("group of one", grpo("grpo.group_size=1"), "grpo.group_size=1: estimator 'grpo' with std_ddof=1 needs >= 2",
         True),
    Case("rloo group of one", grpo("grpo.group_size=1", 'grpo.advantage="rloo"'),
         "grpo.group_size=1: estimator 'rloo' needs >= 2", True),
    Case("greedy GRPO", grpo("grpo.temperature=0"), "grpo.temperature=0.0: must be > 0", True),
    Case("top_p above 1", grpo("grpo.top_p=1.5"), "grpo.top_p=1.5: must be in (0, 1]", True),
    Case("clip above 1", grpo("grpo.clip_low=1.5"), "grpo.clip_low=1.5: must be in [0, 1)", True),
    Case("dual clip at most 1", grpo("grpo.dual_clip=0.5"), "grpo.dual_clip=0.5: must be 0 (off) or > 1", True),
    Case("unknown reward function", grpo('grpo.rewards=["format", "kindness"]'),
         "unknown reward function(s) ['kindness']", True),
    Case("rewards vs reward weights", grpo("grpo.reward_weights=[1.0]"),
         "grpo.rewards=['format', 'accuracy'] and grpo.reward_weights=[1.0]: one weight per reward function", True),
    Case("lengths beyond the model's positions", grpo("grpo.max_new_tokens=4000"),
         "grpo.max_prompt_length=512 + grpo.max_new_tokens=4000 = 4512: longer than", True),
    Case("prompts per step vs mini-batch", grpo("grpo.prompts_per_step=6"),
         "grpo.prompts_per_step=6, grpo.mini_batch=4: prompts_per_step must be a multiple of mini_batch", True),
    Case("GRPO optimizer lr below 0", grpo("grpo.optim.lr=-1e-4"), "grpo.optim.lr=-0.0001: the learning rate must be "
         ">= 0", True),
    Case("missing prompt file", grpo('grpo.paths=["{d}/missing.jsonl"]'), "grpo.paths[0] = '{d}/missing.jsonl'", True),
    Case("prompt without an answer", grpo('grpo.paths=["{d}/no_answer.jsonl"]'),
         "{d}/no_answer.jsonl:1: missing or empty 'answer'"),
    Case("GRPO resuming an SFT run's checkpoint", grpo(), "{run}/checkpoints/step_00000002/reference.safetensors"),
    # ---- train.py without --config (the embedded default): errors while loading its config ----
    Case("embedded: unknown key", embedded("--set", "recipe.nope=1"), "--set recipe.nope=1: unknown key 'nope' in "
         "recipe", True),
    Case("embedded: wrong type", embedded("--set", "grpo.group_size=two"), "grpo.group_size: expected int", True),
    Case("embedded: group of one", embedded("--set", "grpo.group_size=1"), "grpo.group_size=1: estimator 'grpo'",
         True),
    Case("embedded: micro-batch", embedded("--set", "sft.micro_batch=5"), "sft.global_batch=16, sft.micro_batch=5",
         True),
    # ---- psyche subcommands ----
    Case("chat: truncated model.safetensors", psyche("chat", "{trunc}"), "{trunc}/model.safetensors", stdin="hi\n"),
    Case("chat: corrupt tokenizer.json", psyche("chat", "{tokbad}"), "{tokbad}/tokenizer.json", stdin="hi\n"),
    Case("chat: no config.json", psyche("chat", "{nocfg}"), "{nocfg}/config.json: config.json not found",
         stdin="hi\n"),
    Case("chat: missing directory", psyche("chat", "{d}/no_such_model"), "'{d}/no_such_model' does not exist",
         status=2),
    Case("chat: reply longer than the context", psyche("chat", "{ckpt}", "--max-new-tokens", "100000"),
         "--max-new-tokens", status=2, stdin="hi\n"),
    Case("serve: shapes do not match", psyche("serve", "{shape}", "--port", "0"), "{shape}/config.json"),
    Case("eval: truncated model.safetensors", psyche("eval", "--model", "{trunc}", "--data", "{pceb}", "--out",
                                                     "{d}/eval_out"), "{trunc}/model.safetensors"),
    Case("eval: not a benchmark folder", psyche("eval", "--model", "{ckpt}", "--data", "{d}", "--out",
                                                "{d}/eval_out"), "{d}: not a PCEB folder"),
    Case("score: malformed predictions", psyche("score", "--data", "{pceb}", "{d}/bad_predictions.jsonl"),
         "{d}/bad_predictions.jsonl:2"),
    Case("data clean: malformed JSONL", psyche("data", "clean", "{d}/malformed.jsonl", "{d}/cleaned.jsonl",
                                               "--quiet"), "{d}/malformed.jsonl:2"),
    Case("data: bad backend spec", psyche("data", "questions", "{d}/empty.jsonl", "{d}/questions.jsonl", "--backend",
                                          "gpt", "--quiet"), "backend spec 'gpt'", status=2),
    Case("plot: metrics cut mid-line", psyche("plot", "{cut}", "--out", "{d}/plot.png"), "{cut}/metrics.jsonl:2"),
    Case("compare: metrics cut mid-line", psyche("compare", "{cut}"), "{cut}/metrics.jsonl:2"),
    Case("compare: not a run directory", psyche("compare", "{pceb}"), "{pceb}: no metrics.jsonl"),
    Case("replay: damaged step dump", psyche("replay", "{dump}"), "{dump}: not a readable step dump"),
    Case("task-eval: no test set", psyche("task-eval", "{run}", "{ckpt}"), "{run}/data/test.jsonl: no test set"),
    Case("init-model: unknown preset", psyche("init-model", "--preset", "huge", "--out", "{d}/new_model"),
         "unknown model preset 'huge'"),
]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_ckpt):
    """The workspace the cases point at: a finished tiny SFT run, broken copies of a checkpoint, bad data."""
    root = tmp_path_factory.mktemp("ws")
    d = root / "inputs"
    d.mkdir()
    run = root / "run"
    r = subprocess.run([sys.executable, *sft("sft.max_steps=2", "checkpoint.every=1", out=str(run))], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ckpts = {}
    for name in ("trunc", "nocfg", "tokbad", "shape"):
        ckpts[name] = d / f"ckpt_{name}"
        shutil.copytree(tiny_ckpt, ckpts[name])
    st = ckpts["trunc"] / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    (ckpts["nocfg"] / "config.json").unlink()
    (ckpts["tokbad"] / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    cfg = json.loads((ckpts["shape"] / "config.json").read_text())
    cfg["hidden_size"] *= 2
    (ckpts["shape"] / "config.json").write_text(json.dumps(cfg))
    vocab = cfg["vocab_size"]
    for name, change in {"heads0": {"num_attention_heads": 0}, "kv0": {"num_key_value_heads": 0},
                         "heads0hd": {"num_attention_heads": 0, "head_dim": 16}, "rope": {"rope_theta": -1},
                         "eps": {"rms_norm_eps": "1e-6"}, "huge": {"num_hidden_layers": 1000, "hidden_size": 65536},
                         "wide": {"hidden_size": 1_000_000}, "yarn": {"rope_scaling": {"type": "yarn", "factor": 4.0}},
                         "int8": {"torch_dtype": "int8"}, "untied": {"tie_word_embeddings": False},
                         "eos": {"eos_token_id": vocab + 5}}.items():
        ckpts[name] = d / f"ckpt_{name}"
        shutil.copytree(tiny_ckpt, ckpts[name])
        c = json.loads((ckpts[name] / "config.json").read_text())
        (ckpts[name] / "config.json").write_text(json.dumps({**c, **change}))
    from safetensors.torch import load_file, save_file

    from helpers import tiny_config
    from psyche.lora import adapter_config, add_lora, save_adapter
    from psyche.model import build_model

    wide = build_model(tiny_config(n_head=4, head_dim=32), seed=0)  # an adapter of a base twice as wide
    add_lora(wide, 4, 8.0, ["q_proj"])
    save_adapter(d / "adapter", wide.state_dict(), adapter_config(4, 8.0, ["q_proj"], 0.0, False))
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        ckpts[name] = d / f"ckpt_{name}"
        shutil.copytree(tiny_ckpt, ckpts[name])
        sd = load_file(ckpts[name] / "model.safetensors")
        sd["model.norm.weight"].fill_(value)
        save_file(sd, ckpts[name] / "model.safetensors", metadata={"format": "pt"})

    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    (d / "malformed.jsonl").write_text(good + '\n{"messages": [\n')
    (d / "empty.jsonl").write_text("")
    (d / "no_assistant.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    (d / "no_answer.jsonl").write_text(json.dumps({"question": "q?", "options": {"A": "x", "B": "y"}}) + "\n")
    (d / "invalid.toml").write_text("[optim\nlr = 1\n")
    (d / "unknown_key.toml").write_text("[optim]\nlrr = 1e-3\n")
    (d / "unknown_section.toml").write_text("[trainer]\nsteps = 3\n")
    (d / "wrong_type.toml").write_text('[optim]\nlr = "fast"\n')
    pceb, _ = make_pceb(d / "pceb")
    (d / "bad_predictions.jsonl").write_text('{"id": "theory/single/x/a.json#0", "response": "A"}\n{"id": \n')
    cut = d / "cut_run"
    cut.mkdir()
    (cut / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    dump = d / "step_dump"
    dump.mkdir()
    (dump / "step.json").write_text('{"step": 3, "world_size": ')
    values = {"run": run, "d": d, "fresh": root / "fresh", "ckpt": tiny_ckpt, "pceb": pceb, "cut": cut,
              "adapter": d / "adapter",
              "dump": dump, **{k: str(v) for k, v in ckpts.items()}}
    return root, {k: str(v) for k, v in values.items()}


def run_case(argv: list[str], stdin: str = "") -> tuple[subprocess.CompletedProcess, float]:
    """Run one command from the repository root -> (result, CPU seconds the child used)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=300,
                       env=ENV)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_the_table_has_at_least_35_distinct_cases():
    assert len(CASES) >= 35 and len({c.name for c in CASES}) == len(CASES)
    assert sum(c.config for c in CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_line_error_and_changes_nothing(ws, case):
    root, values = ws
    argv = [a.format(**values) for a in case.argv]
    culprit = case.culprit.format(**values)
    before = _tree(root)
    r, cpu_s = run_case(argv, case.stdin)
    out = r.stdout + r.stderr
    assert r.returncode == case.status, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and culprit in errors[0], r.stderr[-3000:]
    assert _tree(root) == before, "the workspace changed"
    assert not Path(values["fresh"]).exists()
    if case.config:
        assert r.stdout == "", r.stdout[-2000:]  # no resolved config, no "data:" or "model:" line: nothing was built
        assert cpu_s < CONFIG_CPU_S, f"{cpu_s:.1f} s of CPU before the error"


def test_debug_flag_and_env_keep_the_traceback(ws):
    _, values = ws
    argv = sft("optim.lr=-1", out=values["fresh"])
    r, _ = run_case(argv[:1] + ["--debug"] + argv[1:])
    assert r.returncode == 1 and "Traceback" in r.stderr and "ConfigError: optim.lr=-1.0" in r.stderr
    env_before = ENV.copy()
    ENV["PSYCHE_DEBUG"] = "1"
    try:
        r, _ = run_case(psyche("compare", values["cut"]))
    finally:
        ENV.clear()
        ENV.update(env_before)
    assert r.returncode == 1 and "Traceback" in r.stderr and "DataError" in r.stderr
    r, _ = run_case(psyche("--debug", "compare", values["cut"]))
    assert r.returncode == 1 and "Traceback" in r.stderr


@pytest.mark.dist
def test_config_error_under_torchrun_is_one_line_and_names_the_key(tmp_path):
    """Each rank checks the config before any process group; rank 0 prints the line, and every rank's error file
    gives it to the launcher's failure summary (the launcher's own report of a failed child follows it)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
           *grpo("grpo.group_size=1", out=str(out))]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    text = r.stdout + r.stderr
    assert r.returncode == 1, text[-3000:]
    assert text.count("Error: grpo.group_size=1: estimator 'grpo'") <= 1
    assert "traceback : grpo.group_size=1: estimator 'grpo' with std_ddof=1" in text, text[-3000:]
    assert "train.py\", line" not in text and "/psyche/" not in text  # no frame of ours: no traceback of the child
    assert not out.exists()
