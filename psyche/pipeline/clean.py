"""`psyche data clean`: raw psychology text -> clean passages, near-duplicates removed.

Rules, applied in this order to each record's text field (`clean_text`):
1. Unicode: NFKC (full-width letters and digits -> ASCII, Kangxi radicals -> the CJK characters); control and
   zero-width characters removed (line breaks and tabs kept). NFKC also makes Chinese full-width punctuation
   (，：；？！（）) ASCII and … into "..."; rule 5 restores them in Chinese context.
2. Links: markdown links [text](url) -> text; URLs (http://, https://, www.) and e-mail addresses removed.
3. Emoji and pictographs removed (emoji and symbol blocks, dingbats, flags, skin tones, variation selectors,
   zero-width joiners).
4. Advertisements: a sentence (ended by 。！？!? ； a line break, or ". ") that holds an ad marker (AD_PATTERNS:
   关注公众号, 扫码, 加微信, 阅读原文, a mobile number, "click here", ...) is removed whole. The markers are
   phrases, not words: "广告心理学" (advertising psychology) is content and stays.
5. Punctuation: in Chinese context (a CJK character before or after, spaces ignored) ASCII , : ; ? ! ( )
   become ，：；？！（）, and "..." / "。。。" become "……"; a run of one repeated ，。！？、 becomes one;
   spaces between CJK characters and before punctuation are removed; runs of spaces become one; each line is
   stripped; three or more line breaks become two.
Then per record (`clean_records`):
6. Too short: fewer than `min_chars` characters left -> dropped ("too short").
7. Near-duplicates: MinHash (num_perm permutations, seed 1) over character n-grams (n = `ngram`) of the text
   with spaces and punctuation removed, NFKC and lower-cased; LSH at the Jaccard `threshold`. A text whose
   estimated Jaccard similarity with an already kept text is >= threshold is dropped ("near-duplicate", with
   the kept text's id); the first one seen is kept. On a rerun the index is rebuilt from the kept output.
Records whose text field is missing or not a string are dropped ("no text").
"""

from __future__ import annotations

import re
import unicodedata

from psyche.pipeline.io import Journal, Result, Summary, run_step

CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_CHAR = re.compile(f"[{CJK}]")

_MD_LINK = re.compile(r"\[([^\]\n]*)\]\((?:https?://|www\.)[^)\s]*\)")
_URL = re.compile(r"(?:https?://|www\.)[A-Za-z0-9\-._~:/?#\[\]@!$&'*+,;=%]+", re.IGNORECASE)
_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
_EMOJI = re.compile(
    "[\U0001F000-\U0001FAFF"  # mahjong .. symbols and pictographs extended-A (incl. flags, skin tones)
    "\u2600-\u27BF"  # miscellaneous symbols, dingbats
    "\u2B00-\u2BFF"  # arrows and symbols (⭐ ⬆)
    "\u2300-\u23FF"  # technical (⌚ ⏰)
    "\uFE00-\uFE0F\u200D\u20E3"  # variation selectors, zero-width joiner, keycap
    "\U000E0000-\U000E007F]+")  # tags
_INVISIBLE = re.compile(r"[\u200B-\u200F\u2060\uFEFF\u00AD\x00-\x08\x0B-\x1F\x7F]")  # zero-width, controls

AD_PATTERNS = [
    r"关注[^。！？\n]{0,8}公众号", r"公众号[:：]", r"扫[描一]?[下扫]?[方面]?的?二维码", r"扫码", r"长按(识别|关注|扫码)",
    r"(加|添加)[我老师客服]{0,2}的?(微信|vx|VX|QQ)", r"微信号", r"\bv[xX][:：]", r"QQ群", r"加群",
    r"点击(下方|上方)?(链接|阅读原文|关注)", r"阅读原文", r"欢迎(转发|点赞|分享|关注)", r"点赞.{0,3}(转发|在看|关注)",
    r"转载请(注明|联系)", r"免费领取", r"限时(优惠|特价|折扣|抢购)", r"优惠券", r"包邮", r"抢购",
    r"(报名|咨询|客服|联系)(热线|电话)", r"【广告】", r"^\s*广告[:：]", r"(?<!\d)1[3-9]\d{9}(?!\d)",
    r"\bclick here\b", r"\bsubscribe (to|now)\b", r"\bfollow us\b", r"\bsponsored\b",
    r"\bbuy now\b", r"\bpromo(tion)? code\b", r"\blimited[- ]time offer\b", r"\buse code\b",
]
_AD = re.compile("|".join(f"(?:{p})" for p in AD_PATTERNS), re.MULTILINE | re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[。！？!?；\n])|(?<=\.\s)")

_TO_FULL = {",": "，", ":": "：", ";": "；", "?": "？", "!": "！", "(": "（", ")": "）"}


def _is_cjk(c: str) -> bool:
    return bool(c) and bool(_CJK_CHAR.match(c))


def _neighbour_cjk(text: str, start: int, end: int) -> bool:
    """Is the first non-space character before `start` or after `end` a CJK character?"""
    i = start - 1
    while i >= 0 and text[i] == " ":
        i -= 1
    j = end
    while j < len(text) and text[j] == " ":
        j += 1
    return (i >= 0 and _is_cjk(text[i])) or (j < len(text) and _is_cjk(text[j]))


def strip_links(text: str) -> tuple[str, int]:
    text, n1 = _MD_LINK.subn(r"\1", text)
    text, n2 = _URL.subn("", text)
    text, n3 = _EMAIL.subn("", text)
    return text, n1 + n2 + n3


def strip_emoji(text: str) -> tuple[str, int]:
    return _EMOJI.subn("", text)


def strip_ads(text: str) -> tuple[str, int]:
    """Remove every sentence holding an ad marker; returns (text, sentences removed)."""
    kept, n = [], 0
    for s in _SENTENCE_END.split(text):
        if _AD.search(s):
            n += 1
            if s.endswith("\n"):
                kept.append("\n")
        else:
            kept.append(s)
    return "".join(kept), n


def normalize_punctuation(text: str) -> str:
    """Rule 5 of the module docstring."""
    def ellipsis(m):
        return "……" if _neighbour_cjk(text, m.start(), m.end()) or m.group().startswith("。") else m.group()

    def full_width(m):  # a run of ASCII punctuation, converted as a whole
        if m.group() == ":" and text.startswith("//", m.end()):
            return m.group()
        return "".join(_TO_FULL[c] for c in m.group()) if _neighbour_cjk(text, m.start(), m.end()) else m.group()

    text = re.sub(r"\.{3,}|。{3,}|…+", ellipsis, text)
    text = re.sub(r"[,:;?!()]+", full_width, text)
    text = re.sub(r"([，。！？、；])\1+", r"\1", text)
    text = re.sub(f"(?<=[{CJK}，。！？、；：（）“”])[ \t]+(?=[{CJK}，。！？、；：（）“”])", "", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([,.;:!?，。；：！？）])", r"\1", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def clean_text(text: str) -> tuple[str, dict]:
    """Rules 1-5. Returns (clean text, counts of what was removed: links, emoji, ad_sentences)."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[^\S\n]", " ", _INVISIBLE.sub("", text))  # other white space (tab, U+3000, ...) -> space
    text, links = strip_links(text)
    text, emoji = strip_emoji(text)
    text, ads = strip_ads(text)
    return normalize_punctuation(text), {"links": links, "emoji": emoji, "ad_sentences": ads}


# ---------------------------------------------------------------- near-duplicates

def shingles(text: str, n: int = 5) -> set[str]:
    """Character n-grams of the NFKC, lower-cased text without spaces and punctuation."""
    t = re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", text).lower())
    if len(t) <= n:
        return {t} if t else set()
    return {t[i:i + n] for i in range(len(t) - n + 1)}


class NearDuplicateIndex:
    """MinHash-LSH over character shingles (datasketch). `find(text)` -> (key, estimated Jaccard) of the most
    similar indexed text at or above the threshold, else None; `add(key, text)` indexes a kept text."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5):
        try:
            from datasketch import MinHashLSH
        except ModuleNotFoundError:
            raise ModuleNotFoundError("near-duplicate removal needs datasketch: pip install 'psyche[data]'") from None
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.sigs = {}

    def signature(self, text: str):
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=1)
        m.update_batch([s.encode("utf-8") for s in sorted(shingles(text, self.ngram))])
        return m

    def find(self, text: str, sig=None):
        sig = sig if sig is not None else self.signature(text)
        best = None
        for key in self.lsh.query(sig):
            j = sig.jaccard(self.sigs[key])
            if j >= self.threshold and (best is None or j > best[1]):
                best = (key, j)
        return best

    def add(self, key: str, text: str, sig=None):
        if key in self.sigs:
            return
        sig = sig if sig is not None else self.signature(text)
        self.lsh.insert(key, sig)
        self.sigs[key] = sig


# ---------------------------------------------------------------- the step

def clean_records(records, journal: Journal, *, field: str = "text", min_chars: int = 20, threshold: float = 0.8,
                  num_perm: int = 128, ngram: int = 5, limit: int | None = None, progress: bool = True) -> Summary:
    """Clean records [(record, where)] into journal output "out": {"id", ...the record's fields, field: clean}."""
    index = NearDuplicateIndex(threshold, num_perm, ngram)
    for rec in journal.records("out"):
        index.add(str(rec["id"]), rec[field])
    summary = Summary("clean")

    def process(batch):
        for key, rec, where in batch:
            text = rec.get(field)
            if not isinstance(text, str):
                yield Result(key, "dropped", "no text", detail={"where": where, "field": field})
                continue
            clean, removed = clean_text(text)
            summary.counts.update({k: v for k, v in removed.items() if v})
            if len(clean) < min_chars:
                yield Result(key, "dropped", "too short", detail={"chars": len(clean), **removed})
                continue
            sig = index.signature(clean)
            dup = index.find(clean, sig)
            if dup is not None:
                yield Result(key, "dropped", "near-duplicate",
                             detail={"of": dup[0], "jaccard": round(dup[1], 3), **removed})
                continue
            index.add(key, clean, sig)
            out = {"id": key, **{k: v for k, v in rec.items() if k != "id"}, field: clean}
            yield Result(key, "kept", outputs={"out": [out]}, detail=removed)

    return run_step("clean", records, journal, process, batch_size=64, limit=limit, summary=summary,
                    progress=progress)
