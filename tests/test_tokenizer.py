"""Tokenizer loading, parity with transformers, ChatML rendering and assistant-only loss masks."""

import pytest

from psyche.tokenizer import (QWEN_DEFAULT_SYSTEM, SAMPLE_CORPUS, Tokenizer, TokenizerError, render_chat,
                              train_tokenizer)

MIXED = ["心理咨询师应当尊重来访者 and keep neutral 😊🧠!", "Ａｎｓｗｅｒ：ＡＢＤ。", "tab\tand\n\nnewlines  x",
         "<|im_start|>user\nhi<|im_end|>", "émoji 👩‍👩‍👧 mixed 中文English123"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = train_tokenizer(SAMPLE_CORPUS, vocab_size=600)
    d = tmp_path_factory.mktemp("tok")
    t.save(d)
    return Tokenizer.from_dir(d), d


def test_ids_match_transformers(tok):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    t, d = tok
    hf = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(d)
    for text in MIXED:
        ids = t.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False) == auto.encode(text, add_special_tokens=False)
        assert t.decode(ids) == hf.decode(ids)


def test_chatml_rendering_character_for_character():
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi!"}]
    assert render_chat(msgs, system=QWEN_DEFAULT_SYSTEM) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n")
    assert render_chat(msgs[:1], add_generation_prompt=True) == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    own = [{"role": "system", "content": "S"}] + msgs[:1]
    assert render_chat(own, system="ignored") == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"


def test_chat_template_matches_transformers(tok, tmp_path):
    from transformers import AutoTokenizer

    t = train_tokenizer(SAMPLE_CORPUS, vocab_size=400)
    t.default_system = QWEN_DEFAULT_SYSTEM
    t.save(tmp_path)
    t2 = Tokenizer.from_dir(tmp_path)
    assert t2.default_system == QWEN_DEFAULT_SYSTEM
    hf = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "来访者说: I can't sleep."}, {"role": "assistant", "content": "<think>x</think>A"}]
    for gen in (False, True):
        assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == t2.render_chat(msgs, gen)


def test_loss_mask_covers_exactly_assistant_tokens(tok):
    t, _ = tok
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "问题一"},
            {"role": "assistant", "content": "回答一 first"}, {"role": "user", "content": "second q"},
            {"role": "assistant", "content": "<think>why</think>B"}]
    ids, mask = t.encode_chat(msgs)
    assert len(ids) == len(mask)
    assert ids == t.encode(t.render_chat(msgs))  # same ids as encoding the rendered text
    target = [i for i, m in zip(ids, mask) if m]
    expect = t.encode("回答一 first") + [t.im_end_id] + t.encode("<think>why</think>B") + [t.im_end_id]
    assert target == expect
    # every masked-out token decodes to the non-assistant text
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(t.decode(cur))
            cur = []
    assert spans == ["回答一 first<|im_end|>", "<think>why</think>B<|im_end|>"]


def test_generation_prompt_in_encode_chat(tok):
    t, _ = tok
    ids, mask = t.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert t.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" and not any(mask)


def test_think_tags_are_single_tokens(tok):
    t, _ = tok
    assert len(t.encode("<think>")) == 1 and len(t.encode("</think>")) == 1


def test_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    t = train_tokenizer(SAMPLE_CORPUS, vocab_size=400)
    with pytest.raises(TokenizerError, match="message 0"):
        t.encode_chat([{"role": "user"}])


def test_sentencepiece_backend(tmp_path):
    import sentencepiece as spm

    (tmp_path / "corpus.txt").write_text("\n".join(SAMPLE_CORPUS * 20))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=420, minloglevel=2, user_defined_symbols=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                   character_coverage=1.0, byte_fallback=True)
    t = Tokenizer.from_dir(tmp_path)
    assert t.kind == "sentencepiece"
    ids, mask = t.encode_chat([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "ok"}])
    assert ids[0] == t.im_start_id and t.decode([i for i, m in zip(ids, mask) if m]) == "ok<|im_end|>"
