"""`psyche chat` driven through piped stdin."""

from click.testing import CliRunner

from psyche.chat import chat
from psyche.pceb import PSYCHE_SYSTEM, PSYCHE_USER_PREFIX
from psyche.sampler import generate
from psyche.tokenizer import Tokenizer
from psyche.weights import load_pretrained


def run(ckpt, text, *args):
    res = CliRunner().invoke(chat, [str(ckpt), "--max-new-tokens", "10", *args], input=text)
    assert res.exit_code == 0, res.output
    return res.stdout


def expected(ckpt, turns, system=PSYCHE_SYSTEM):
    """What a greedy multi-turn dialogue must print, computed with the sampler directly."""
    model, _ = load_pretrained(ckpt)
    tok = Tokenizer.from_dir(ckpt)
    msgs, out = [{"role": "system", "content": system}], ""
    for user in turns:
        msgs.append({"role": "user", "content": PSYCHE_USER_PREFIX + user})
        ids, _ = tok.encode_chat(msgs, add_generation_prompt=True)
        r = generate(model, [ids], max_new_tokens=10, temperature=0, stop_token_ids=tok.stop_ids)
        reply = tok.decode(r.tokens[0, : r.lengths[0]].tolist(), skip_special_tokens=True)
        out += reply + ("\n" if r.finished[0] else " [truncated]\n")
        msgs.append({"role": "assistant", "content": reply})
    return out


def test_piped_turns_stream_the_sampler_output(tiny_ckpt):
    got = run(tiny_ckpt, "hello\n你好\n/exit\nnot read\n", "--temperature", "0")
    assert got == expected(tiny_ckpt, ["hello", "你好"])  # multi-turn history; nothing after /exit


def test_reset_and_system(tiny_ckpt):
    after_reset = run(tiny_ckpt, "hello\n/reset\nbye\n", "--temperature", "0")
    first = expected(tiny_ckpt, ["hello"])
    assert after_reset == first + expected(tiny_ckpt, ["bye"])
    sys_a = run(tiny_ckpt, "/system You are terse.\nbye\n", "--temperature", "0")
    assert sys_a == expected(tiny_ckpt, ["bye"], system="You are terse.")
    assert sys_a == run(tiny_ckpt, "bye\n", "--temperature", "0", "--system", "You are terse.")


def test_sampling_defaults_are_the_seeds(tiny_ckpt):
    params = {p.name: p.default for p in chat.params}
    assert params["temperature"] == 0.7 and params["top_p"] == 0.9 and params["preset"] == "psyche"
    a = run(tiny_ckpt, "hello\n", "--seed", "1")
    b = run(tiny_ckpt, "hello\n", "--seed", "1")
    assert a == b


def test_a_temperature_too_small_to_divide_by_is_a_usage_error(tiny_ckpt):
    res = CliRunner().invoke(chat, [str(tiny_ckpt), "--temperature", "1e-38"], input="hello\n")
    assert res.exit_code == 2 and "--temperature" in res.output and "temperature must be 0 (greedy)" in res.output


def test_a_message_too_long_for_the_context_is_dropped_and_the_session_goes_on(tiny_ckpt):
    """Alone it leaves no room for the reply (the tiny model's context is 2048 tokens): one line says so, the
    dialogue before it is kept, the next turn is answered."""
    long = "焦虑 " * 3000
    res = CliRunner().invoke(chat, [str(tiny_ckpt), "--max-new-tokens", "10", "--temperature", "0"],
                             input=f"hello\n{long}\nbye\n")
    assert res.exit_code == 0, res.output
    assert res.stdout == expected(tiny_ckpt, ["hello", "bye"])
    notes = [line for line in res.stderr.splitlines() if "message not sent" in line]
    assert len(notes) == 1 and "at most 2038 fit" in notes[0]
