"""Tokenizers and the ChatML chat format of Qwen2.5.

Loads `tokenizer.json` (the `tokenizers` library) or, failing that, `tokenizer.model` (sentencepiece) from a
checkpoint directory. Renders messages as ChatML and encodes them with an assistant-only loss mask.
`train_tokenizer` makes a small byte-level BPE with Qwen's pre-tokenizer and specials, for tests and the
CPU demo.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIALS = (ENDOFTEXT, IM_START, IM_END)
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2's pre-tokenizer split (from its tokenizer.json): letters, single digits, punctuation runs, newlines.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")


class TokenizerError(ValueError):
    pass


def render_chat(messages: list[dict], add_generation_prompt: bool = False, system: str | None = None) -> str:
    """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message; `system` is prepended when the
    messages do not start with a system turn; the generation prompt is `<|im_start|>assistant\\n`."""
    out = []
    if system is not None and (not messages or messages[0]["role"] != "system"):
        out.append(f"{IM_START}system\n{system}{IM_END}\n")
    for m in messages:
        out.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def chat_template_jinja(system: str | None) -> str:
    """The same format as a Jinja chat template, for Hugging Face tools reading tokenizer_config.json."""
    head = ""
    if system is not None:
        head = ("{%- if not messages or messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\n"
                + system.replace("'", "\\'") + "<|im_end|>\\n' }}{%- endif %}")
    return (head + "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content']"
            " + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
            "{%- endif %}")


class Tokenizer:
    """One interface over a `tokenizers.Tokenizer` or a sentencepiece model."""

    def __init__(self, backend, kind: str, default_system: str | None = None, source: Path | None = None):
        self.backend, self.kind, self.default_system, self.source = backend, kind, default_system, source
        self.special_ids = {}
        for tok in SPECIALS:
            i = self._token_to_id(tok)
            if i is None:
                raise TokenizerError(f"{source}: special token {tok!r} is not in the vocabulary")
            self.special_ids[tok] = i
        self.im_start_id = self.special_ids[IM_START]
        self.im_end_id = self.special_ids[IM_END]
        self.eot_id = self.special_ids[ENDOFTEXT]
        self.pad_id = self.eot_id  # Qwen pads with <|endoftext|>
        self.stop_ids = [self.im_end_id, self.eot_id]
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in SPECIALS) + ")")

    # ---- loading ----
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        default_system = None
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                template = json.loads(cfg_file.read_text()).get("chat_template") or ""
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{cfg_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
            if isinstance(template, str) and QWEN_DEFAULT_SYSTEM in template:
                default_system = QWEN_DEFAULT_SYSTEM
            elif isinstance(template, str) and "<|im_start|>system\\n" in template:
                m = re.search(r"<\|im_start\|>system\\n(.*?)<\|im_end\|>", template)
                default_system = m.group(1).replace("\\'", "'") if m else None
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTok

            try:
                backend = HFTok.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a bare Exception on bad files
                raise TokenizerError(f"{path / 'tokenizer.json'}: cannot be read ({e})") from None
            return cls(backend, "tokenizers", default_system, path / "tokenizer.json")
        if (path / "tokenizer.model").is_file():
            import sentencepiece as spm

            backend = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            return cls(backend, "sentencepiece", default_system, path / "tokenizer.model")
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model found")

    def save(self, path: str | Path):
        path = Path(path)
        if self.kind == "tokenizers":
            self.backend.save(str(path / "tokenizer.json"))
        else:
            shutil.copyfile(self.source, path / "tokenizer.model")
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None, "eos_token": IM_END, "pad_token": ENDOFTEXT, "unk_token": None,
            "model_max_length": 131072, "clean_up_tokenization_spaces": False, "split_special_tokens": False,
            "additional_special_tokens": [IM_START, IM_END],
            "chat_template": chat_template_jinja(self.default_system),
        }
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    # ---- basics ----
    def _token_to_id(self, tok):
        if self.kind == "tokenizers":
            return self.backend.token_to_id(tok)
        i = self.backend.piece_to_id(tok)
        return None if i == self.backend.unk_id() and tok != self.backend.id_to_piece(i) else i

    @property
    def vocab_size(self) -> int:
        if self.kind == "tokenizers":
            return self.backend.get_vocab_size(with_added_tokens=True)
        return self.backend.get_piece_size()

    def token_to_id(self, tok: str) -> int | None:
        return self._token_to_id(tok)

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special-token strings in the text become their ids; no BOS/EOS is added."""
        if self.kind == "tokenizers":
            return self.backend.encode(text, add_special_tokens=False).ids
        ids = []
        for part in self._special_re.split(text):
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(self.backend.encode(part))
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "tokenizers":
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        specials = {v: k for k, v in self.special_ids.items()}
        out, run = [], []
        for i in ids + [None]:
            if i is None or i in specials:
                if run:
                    out.append(self.backend.decode(run))
                    run = []
                if i is not None and not skip_special_tokens:
                    out.append(specials[i])
            else:
                run.append(i)
        return "".join(out)

    # ---- chat ----
    def render_chat(self, messages, add_generation_prompt=False, system: str | None = None) -> str:
        return render_chat(messages, add_generation_prompt, system if system is not None else self.default_system)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False, system: str | None = None):
        """Messages -> (ids, loss_mask). The mask is 1 exactly on each assistant turn's content tokens and its
        closing `<|im_end|>` (every assistant turn of a multi-turn dialogue), 0 elsewhere.

        Everything before an assistant turn's content (including `<|im_start|>assistant\\n`) is encoded as
        one string, and each assistant content on its own: the token boundary at the start of a reply is
        then the one the model meets at generation time, when it continues the generation prompt.
        """
        system = system if system is not None else self.default_system
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TokenizerError(f"message {i}: needs 'role' and 'content', got {m!r}")
        ids, mask = [], []
        prompt = ""
        if system is not None and (not messages or messages[0]["role"] != "system"):
            prompt = f"{IM_START}system\n{system}{IM_END}\n"
        for m in messages:
            if m["role"] == "assistant":
                prompt += f"{IM_START}assistant\n"
                p = self.encode(prompt)
                c = self.encode(m["content"]) + [self.im_end_id]
                ids += p + c
                mask += [0] * len(p) + [1] * len(c)
                prompt = "\n"
            else:
                prompt += f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n"
        if add_generation_prompt:
            prompt += f"{IM_START}assistant\n"
        p = self.encode(prompt) if prompt else []
        ids += p
        mask += [0] * len(p)
        return ids, mask


# A few sentences of mixed text so a tokenizer trained for tests has merges for both scripts.
SAMPLE_CORPUS = [
    "Cognitive behavioural therapy helps clients notice automatic thoughts and test them against evidence.",
    "心理咨询师应当尊重来访者的价值观，保持中立，不把自己的观点强加给来访者。",
    "The counsellor listens with empathy, reflects feelings, and asks open questions.",
    "焦虑障碍的主要表现包括过度担忧、紧张不安以及自主神经功能紊乱。",
    "Answer: A, B and D are correct. 答案：ABD",
    "<think>The symptoms last more than one year, so the course scores 3.</think>The answer is C.",
    "求助者，女，28岁，公司职员。近半年来情绪低落，失眠，工作效率下降。",
    "Erikson described eight stages of psychosocial development; Piaget described four cognitive stages.",
]


def train_tokenizer(texts, vocab_size: int = 1024, extra_tokens=("<think>", "</think>")) -> Tokenizer:
    """Train a byte-level BPE with Qwen2's pre-tokenizer, ChatML specials and `extra_tokens` as whole tokens."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTok

    tok = HFTok(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    if extra_tokens:
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
    return Tokenizer(tok, "tokenizers")
