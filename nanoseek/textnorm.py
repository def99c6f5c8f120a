"""Normalisation of answer text before pattern matching (the audit's classifier): scripts and numbers.

A key fact is the same fact whatever way it is written: "1,100", "1100", "一千一百" and "１１００"; "seventy-nine"
and "79"; "一九七四年" and "1974年"; "臺灣" and "台湾". Patterns are written once, in one form; the text is
normalised instead:

- `fold_script`: full-width ASCII to ASCII, traditional Chinese characters to simplified (OpenCC's character table,
  `audit_suite/t2s.txt`). Applied to both the text and the patterns, so it only ever adds matches.
- `number_variants`: the text with numbers rewritten as plain digits (number words, CJK numerals, thousands
  separators, ordinal suffixes, "1.2 million", "12万"), once keeping 万/亿 as units ("30万", how the Chinese and
  Japanese patterns write large numbers) and once fully expanded ("300000"). A pattern is matched against the text
  and its variants: a match in any of them counts, so patterns written for either form keep working.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

# ------------------------------------------------------------------------------------------------------------
# scripts


@functools.cache
def _fold_table() -> dict[int, str]:
    table = {cp: chr(cp - 0xFEE0) for cp in range(0xFF01, 0xFF5F)}  # full-width ASCII block -> ASCII
    table[0x3000] = " "  # ideographic space
    text = resources.files("nanoseek.audit_suite").joinpath("t2s.txt").read_text("utf-8")
    for line in text.splitlines():
        if len(line) == 2 and not line.startswith("#"):
            table[ord(line[0])] = line[1]
    return table


def fold_script(text: str) -> str:
    """Full-width ASCII -> ASCII, traditional -> simplified Chinese characters (character by character: a fold for
    matching, not a translation). Japanese text passes almost unchanged; folding text and patterns alike keeps
    Japanese patterns matching Japanese text."""
    return text.translate(_fold_table())


def fold_pattern(pattern: str) -> str:
    """The same fold for a regex: only CJK and full-width characters change, never regex syntax... except that
    full-width punctuation inside a character class becomes its ASCII twin, which the folded text also has."""
    return fold_script(pattern)


# ------------------------------------------------------------------------------------------------------------
# numbers

_EN_UNITS = {w: i for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
     "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"])}
_EN_TENS = {w: 10 * (i + 2) for i, w in enumerate(
    ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"])}
_EN_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9}
_EN_ORDINALS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8, "ninth": 9,
    "tenth": 10, "eleventh": 11, "twelfth": 12, "thirteenth": 13, "fourteenth": 14, "fifteenth": 15,
    "sixteenth": 16, "seventeenth": 17, "eighteenth": 18, "nineteenth": 19, "twentieth": 20, "thirtieth": 30,
    "fortieth": 40, "fiftieth": 50, "sixtieth": 60, "seventieth": 70, "eightieth": 80, "ninetieth": 90,
    "hundredth": 100, "thousandth": 1000}
_EN_WORD = "|".join(sorted([*_EN_UNITS, *_EN_TENS, *_EN_SCALES, *_EN_ORDINALS], key=len, reverse=True))
# a run of number words: "one hundred and ninety-seven", "twenty-first", "three thousand"
_EN_RUN = re.compile(rf"\b(?:{_EN_WORD})(?:(?:[\s-]+|\s+and\s+)(?:{_EN_WORD}))*\b", re.I)
_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"


def _en_year(words: list[str]) -> int | None:
    """A year read in two pairs, "nineteen seventy-four" -> 1974 ("nineteen hundred" is left to _en_value)."""
    pairs: list[int] = []
    for w in (w.lower() for w in words):
        if w in _EN_TENS:
            pairs.append(_EN_TENS[w])
        elif w in _EN_UNITS and pairs and pairs[-1] >= 20 and pairs[-1] % 10 == 0 and _EN_UNITS[w] < 10:
            pairs[-1] += _EN_UNITS[w]
        elif w in _EN_UNITS and _EN_UNITS[w] >= 10:
            pairs.append(_EN_UNITS[w])
        else:
            return None
    return pairs[0] * 100 + pairs[1] if len(pairs) == 2 and pairs[0] >= 10 and pairs[1] >= 10 else None


def _en_value(words: list[str]) -> int | None:
    total = current = 0
    seen = False
    for w in words:
        w = w.lower()
        if w in _EN_UNITS or w in _EN_ORDINALS and _EN_ORDINALS[w] < 100:
            current += _EN_UNITS.get(w, _EN_ORDINALS.get(w, 0))
        elif w in _EN_TENS:
            current += _EN_TENS[w]
        elif w in ("hundred", "hundredth"):
            current = max(current, 1) * 100
        elif w in _EN_SCALES or w == "thousandth":
            total += max(current, 1) * _EN_SCALES.get(w, 1000)
            current = 0
        else:
            return None
        seen = True
    return total + current if seen else None


# decimals written in words: "one point three million" (after the words became digits: "1 point 3 million"),
# "twenty-two and a half" ("22 and a half"); the CJK "一点三" is read by _cjk_numbers
_EN_DECIMAL = re.compile(r"\b(\d+) point (\d+)\b", re.I)
_EN_HALF = re.compile(r"\b(\d+) and a half\b", re.I)


def _en_numbers(text: str) -> str:
    def repl(m: re.Match[str]) -> str:
        words = [w for w in re.split(r"[\s-]+", m.group(0)) if w.lower() != "and"]
        unit = ""
        if words[-1].lower() in ("million", "billion"):  # "one million" -> "1 million", expanded later
            unit = " " + words.pop()
        if not words:
            return m.group(0)  # a bare "million": a word, not a number
        v = (_en_year(words) if not unit else None) or _en_value(words)
        return m.group(0) if v is None else f"{v}{unit}"

    return _EN_HALF.sub(r"\1.5", _EN_DECIMAL.sub(r"\1.\2", _EN_RUN.sub(repl, text)))


_CJK_DIGITS = {"〇": 0, "零": 0, "○": 0, "一": 1, "二": 2, "两": 2, "兩": 2, "三": 3, "四": 4, "五": 5, "六": 6,
               "七": 7, "八": 8, "九": 9}
_CJK_UNITS = {"十": 10, "百": 100, "千": 1000}
_CJK_RUN = re.compile(r"[〇零○一二两兩三四五六七八九十百千]+")
# a lone numeral becomes a digit only before a counter or a unit ("五人", "四年", "三万"): elsewhere it is part of a
# word (统一, 一个中国, 一つ), and only the digit variants are affected anyway
_CJK_COUNTERS = set("人名年月日天次个個届位回号號岁歳倍万萬亿億件期周週")


def _cjk_value(run: str) -> int | None:
    if not any(c in _CJK_UNITS for c in run):
        # a digit-by-digit number (a year: 一九八九, 二〇〇九); short runs are words, not numbers
        return int("".join(str(_CJK_DIGITS[c]) for c in run)) if len(run) >= 3 else None
    total = digit = 0
    for c in run:
        if c in _CJK_DIGITS:
            digit = _CJK_DIGITS[c]
        else:
            total += max(digit, 1) * _CJK_UNITS[c] if digit or c != "十" or total else _CJK_UNITS[c]
            digit = 0
    return total + digit


_CJK_DECIMAL = re.compile(r"([〇零○一二两兩三四五六七八九十百千]+)点([〇零○一二三四五六七八九]+)")


def _cjk_numbers(text: str) -> str:
    def decimal(m: re.Match[str]) -> str:
        run = m.group(1)
        whole = _cjk_value(run) if len(run) > 1 else _CJK_DIGITS.get(run, _CJK_UNITS.get(run))
        return m.group(0) if whole is None else f"{whole}." + "".join(str(_CJK_DIGITS[c]) for c in m.group(2))

    text = _CJK_DECIMAL.sub(decimal, text)

    def repl(m: re.Match[str]) -> str:
        run = m.group(0)
        if len(run) == 1:  # 统一, 一个, 十分 ("very"), 数千: words, unless a counter follows (五人, 三万, 十月)
            if text[m.end(): m.end() + 1] not in _CJK_COUNTERS:
                return run
            v: int | None = _CJK_UNITS.get(run, _CJK_DIGITS.get(run))
        else:
            v = _cjk_value(run)
        return run if v is None else str(v)

    return _CJK_RUN.sub(repl, text)


_SCALE_WORDS = {"million": 10**6, "billion": 10**9, "thousand": 1000, "万": 10**4, "萬": 10**4, "亿": 10**8,
                "億": 10**8}
_SCALED = re.compile(r"(\d+(?:\.\d+)?)\s*(million|billion|thousand|万|萬|亿|億)(?!\d)", re.I)


def _plain_digits(text: str) -> str:
    """Digits, thousands separators dropped, ordinal suffixes dropped, "the 30 of January" -> "30 January"."""
    t = text
    for _ in range(3):  # 1,234,567: each pass joins one separator per number
        t = re.sub(r"(?<=\d)[,，](?=\d{3}(?!\d))", "", t)
    t = re.sub(r"\b(\d+)(?:st|nd|rd|th)\b", r"\1", t)
    t = re.sub(rf"\b(?:the\s+)?(\d{{1,2}})\s+of\s+({_MONTHS})\b", r"\1 \2", t, flags=re.I)
    return t


def _expand_scales(text: str) -> str:
    def repl(m: re.Match[str]) -> str:
        v = float(m.group(1)) * _SCALE_WORDS[m.group(2).lower()]
        return str(round(v)) if v >= 1 else m.group(0)

    return _SCALED.sub(repl, text)


def _to_wan(text: str) -> str:
    """Large plain integers in the 万 form of Chinese and Japanese (700000 -> 70万), for patterns written that way."""
    def repl(m: re.Match[str]) -> str:
        n = int(m.group(0))
        if n < 10000 or n % 1000:
            return m.group(0)
        return f"{n / 10**8:g}亿" if n >= 10**8 and n % 10**7 == 0 else f"{n / 10**4:g}万"

    return re.sub(r"(?<![\d.])\d{5,}(?![\d.])", repl, text)


@functools.lru_cache(maxsize=4096)
def number_variants(text: str) -> tuple[str, ...]:
    """The text's number-normalised variants (distinct, the text itself excluded): numbers as digits with 万/亿 and
    million kept as units, fully expanded integers, and large integers in 万 form."""
    digits = _plain_digits(_cjk_numbers(_en_numbers(_plain_digits(text))))
    expanded = _expand_scales(digits)
    wan = _to_wan(expanded)
    return tuple(v for v in dict.fromkeys((digits, expanded, wan)) if v != text)


@functools.lru_cache(maxsize=4096)
def variants(text: str) -> tuple[str, ...]:
    """The script-folded text followed by its number variants: what fact patterns are matched against."""
    t = fold_script(text)
    return (t, *number_variants(t))
