"""Answer extraction, the way the field scores GSM8K and MATH.

GSM8K (lm-evaluation-harness `gsm8k` / `gsm8k-cot` conventions):
- strict: the answer the model states as final, `#### N` or `The answer is N`; nothing else counts.
- flexible: the last number anywhere in the completion.
Numbers are compared after dropping `$`, thousands commas, a trailing period and trailing decimal zeros.

MATH (Minerva): the last `\\boxed{...}` (else `The final answer is $X$`), compared with the reference by
math-verify (symbolic equivalence: `\\frac{1}{2}` == `0.5` == `\\dfrac12`).
"""

import re

_NUMBER = r"-?[$0-9.,]*[0-9]"
_STRICT = re.compile(rf"(?:####|[Tt]he (?:final )?answer is)\s*:?\s*\$?\s*({_NUMBER})")
_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_FINAL_ANSWER = re.compile(r"[Ff]inal [Aa]nswer:?\s*(?:[Tt]he final answer is)?\s*"
                           r"(.+?)(?:\.\s*I hope it is correct|\n|$)")


def normalize_number(text):
    """'$1,234.50' -> '1234.5', '-0.0' -> '0', '7.' -> '7'; None for text that is not a number."""
    if text is None:
        return None
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not re.fullmatch(r"-?\d+(\.\d+)?|-?\.\d+", s):
        return None
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    sign = "-" if s.startswith("-") else ""
    s = s.lstrip("-").lstrip("0") or "0"
    if s.startswith("."):
        s = "0" + s
    return s if s == "0" else sign + s


def strict_answer(completion):
    """The final answer as stated (`#### N` / `The answer is N`), normalized; None if not stated that way."""
    found = _STRICT.findall(completion)
    return normalize_number(found[-1]) if found else None


def flexible_answer(completion):
    """The last number in the completion (lm-eval's flexible-extract regex), normalized; None if none."""
    for match in reversed(_FLEX.findall(completion)):
        value = normalize_number(match[0] or match[1])
        if value is not None:
            return value
    return None


def gsm8k_reference(answer):
    """The gold number of a GSM8K answer field ('... #### 1,000' -> '1000')."""
    return normalize_number(answer.split("####")[-1])


def last_boxed(text):
    """Contents of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:  # `\boxed 5`
        m = re.match(r"\\boxed\s+([^\s$]+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def math_answer(completion):
    """The model's MATH answer: the last boxed expression, else Minerva's `Final Answer: ... $X$`; None if none."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    found = _FINAL_ANSWER.findall(completion)
    if found:
        return found[-1].strip().strip("$").strip()
    return None


def math_equal(prediction, reference):
    """True when math-verify finds the two LaTeX answers equivalent (`\\frac{1}{2}` vs `0.5`)."""
    if prediction is None:
        return False
    from math_verify import parse, verify

    gold = parse(f"${reference}$")
    pred = parse(f"${prediction}$")
    try:
        return bool(gold and pred and verify(gold, pred))
    except Exception:  # math-verify can raise on pathological input; an unparseable answer is wrong
        return False
