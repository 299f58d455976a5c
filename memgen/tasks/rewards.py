"""Reward functions: a completion's text and the example's target in, a float in [0, 1] out.

- math (GSM8K, MATH): the final answer is the last `\\boxed{...}` of the completion, or else its
  last number; it matches when the normalised strings are equal or both parse to the same number;
- option letter (GPQA): "the answer is (C)", `\\boxed{C}`, "Answer: C", or a final lone letter;
- QA (TriviaQA, PopQA): normalised exact match (lower case, no punctuation, no articles, single
  spaces) of the extracted answer against any alias;
- code (KodCode): the fraction of unit tests passed, run in a sandbox (`memgen.tasks.sandbox`).
"""

from __future__ import annotations

import re
import string
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (or `\\fbox{...}`), braces matched; None when there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: no answer


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def _as_number(text: str) -> Fraction | None:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    match = re.fullmatch(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", text) or re.fullmatch(r"(-?)(-?\d+)/(-?\d+)", text)
    try:
        if match:
            value = Fraction(int(match.group(2)), int(match.group(3)))
            return -value if match.group(1) else value
        return Fraction(Decimal(text))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def normalize_math(answer: str) -> str:
    """A canonical string for a math answer: LaTeX spacing, sizing, units of angle, dollars and
    percent signs, `\\text{}` wrappers, `x =` prefixes and trailing periods removed; `dfrac` and
    `tfrac` written `frac`; spaces dropped."""
    s = answer.strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    for old, new in (("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\left", ""), ("\\right", ""), ("dfrac", "frac"),
                     ("tfrac", "frac"), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""), ("$", ""), ("\\%", ""),
                     ("%", "")):
        s = s.replace(old, new)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = s.replace(" ", "").rstrip(".")
    if s.startswith("."):
        s = "0" + s
    return s


def math_answer(completion: str) -> str | None:
    """The final answer a completion gives: its last boxed expression, else its last number."""
    boxed = last_boxed(completion)
    return boxed if boxed is not None else last_number(completion)


def math_equal(predicted: str | None, target: str) -> bool:
    if predicted is None:
        return False
    a, b = normalize_math(predicted), normalize_math(target)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and x == y


def math_reward(completion: str, target: str) -> float:
    """1.0 when the completion's final answer equals `target` (GSM8K's number or MATH's boxed answer)."""
    return float(math_equal(math_answer(completion), target))


_LETTER_PATTERNS = (
    re.compile(r"answer\s*(?:is|:)\s*\(?\s*([A-Z])\s*\)?(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"\\boxed\{\s*\(?([A-Z])\)?\s*\}"),
    re.compile(r"\(([A-Z])\)"),
)


def option_letter(completion: str, letters: str = "ABCD") -> str | None:
    """The option a completion picks: an explicit "answer is X" / boxed letter first (the last such),
    then the last "(X)", then a lone letter ending the text."""
    for pattern in _LETTER_PATTERNS:
        found = [m.upper() for m in pattern.findall(completion) if m.upper() in letters]
        if found:
            return found[-1]
    tail = re.search(r"(?:^|\s)([A-Z])[.)]?\s*$", completion.strip())
    return tail.group(1) if tail and tail.group(1) in letters else None


def option_reward(completion: str, target: str) -> float:
    """1.0 when the completion picks option `target` (a letter)."""
    return float(option_letter(completion) == target.strip().upper())


def normalize_qa(text: str) -> str:
    """SQuAD-style normalisation: lower case, punctuation and the articles a/an/the removed, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_answer(completion: str) -> str:
    """The answer a QA completion gives: its last boxed expression, else the text after the last
    "answer is" / "Answer:", else its first non-empty line."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    said = re.findall(r"answer\s*(?:is|:)\s*(.+)", completion, re.IGNORECASE)
    if said:
        return said[-1].strip()
    return next((line.strip() for line in completion.splitlines() if line.strip()), "")


def qa_reward(completion: str, aliases: list[str] | str) -> float:
    """1.0 when the normalised answer equals the normalised form of any alias."""
    aliases = [aliases] if isinstance(aliases, str) else list(aliases)
    predicted = normalize_qa(qa_answer(completion))
    return float(bool(predicted) and any(predicted == normalize_qa(a) for a in aliases))


def code_block(completion: str) -> str:
    """The last fenced code block of a completion (```python ... ``` or ``` ... ```), else the whole text."""
    blocks = re.findall(r"```(?:[A-Za-z0-9_+-]*)\n(.*?)```", completion, re.DOTALL)
    return blocks[-1] if blocks else completion


def code_reward(completion: str, tests: str, timeout: float = 10.0, memory_mb: int = 1024) -> float:
    """The fraction of `tests` (pytest-style `test_*` functions importing `solution`) that the
    completion's code passes, run in a sandboxed process; 0.0 when nothing runs."""
    from memgen.tasks.sandbox import run_unit_tests

    result = run_unit_tests(code_block(completion), tests, timeout=timeout, memory_mb=memory_mb)
    return result.passed / result.total if result.total else 0.0
