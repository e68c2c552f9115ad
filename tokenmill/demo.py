"""The demo model's task format, shared by its training script and `tokenmill eval-demo`.

The demo model answers "What is 347 + 589?" digit by digit, ones place first, writing carries
and borrows, and ends with "The answer is N.". Operand pairs with (1000 * a + b) % 97 == 0
are held out of training and make up the evaluation set.
"""

from __future__ import annotations

import random
import re

PAD, BOS, END = "<|pad|>", "<|bos|>", "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, END, "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PLACES = ["Ones", "Tens", "Hundreds", "Thousands"]
ANSWER_RE = re.compile(r"The answer is (-?\d+)\.")


def is_held_out(a: int, b: int) -> bool:
    return (1000 * a + b) % 97 == 0


def question(a: int, op: str, b: int, rng: random.Random | None = None) -> str:
    """The user's question; with rng, one of several phrasings (training), else the plain one."""
    word = "plus" if op == "+" else "minus"
    forms = [f"What is {a} {op} {b}?"] * 6 + [f"What is {a} {word} {b}?", f"Compute {a} {op} {b}.",
                                              f"What's {a}{op}{b}?", f"Calculate {a} {op} {b}.",
                                              f"what is {a} {op} {b}"]
    return rng.choice(forms) if rng is not None else forms[0]


def arithmetic_answer(a: int, op: str, b: int) -> str:
    """The worked answer the model is trained to give."""
    if op == "+":
        lines = ["Let's add digit by digit."] + _add_steps(a, b)
        result = a + b
    else:
        if a >= b:
            lines = ["Let's subtract digit by digit."] + _sub_steps(a, b)
        else:
            lines = [f"{a} is less than {b}, so the answer is negative. Let's compute {b} - {a}."] + _sub_steps(b, a)
        result = a - b
    lines.append(f"The answer is {result}.")
    return "\n".join(lines)


def _digits(n: int) -> list[int]:
    return [(n // 10**i) % 10 for i in range(3)]  # ones first; operands are < 1000


def _add_steps(a: int, b: int) -> list[str]:
    da, db = _digits(a), _digits(b)
    carry, lines = 0, []
    for i in range(3):
        total = da[i] + db[i] + carry
        expr = f"{da[i]} + {db[i]}" + (f" + {carry}" if carry else "")
        line = f"{PLACES[i]}: {expr} = {total}, write {total % 10}"
        carry = total // 10
        lines.append(line + (", carry 1." if carry else "."))
    if carry:
        lines.append("Thousands: carry 1, write 1.")
    return lines


def _sub_steps(a: int, b: int) -> list[str]:
    """a >= b."""
    da, db = _digits(a), _digits(b)
    borrow, lines = 0, []
    for i in range(3):
        expr = f"{da[i]} - {db[i]}" + (f" - {borrow}" if borrow else "")
        value = da[i] - db[i] - borrow
        if value < 0:
            lines.append(f"{PLACES[i]}: 10 + {expr} = {value + 10}, write {value + 10}, borrow 1.")
            borrow = 1
        else:
            lines.append(f"{PLACES[i]}: {expr} = {value}, write {value}.")
            borrow = 0
    return lines


def parse_answer(text: str) -> int | None:
    m = ANSWER_RE.search(text)
    return int(m.group(1)) if m else None


def held_out_questions(num: int, seed: int = 1234) -> list[tuple[int, str, int]]:
    """num held-out (a, op, b) questions, half additions and half subtractions."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(1000) for b in range(1000) if is_held_out(a, b)]
    rng.shuffle(pairs)
    return [(a, "+" if i % 2 == 0 else "-", b) for i, (a, b) in enumerate(pairs[:num])]


def evaluate(llm, num_questions: int = 200, show: int = 0, seed: int = 1234) -> dict:
    """Greedy accuracy of `llm` on held-out questions, in one batch; plus a weather continuation."""
    import time

    from tokenmill.sampling_params import SamplingParams

    qs = held_out_questions(num_questions, seed)
    prompts = [llm.chat_prompt([{"role": "user", "content": question(a, op, b)}]) for a, op, b in qs]
    params = SamplingParams(max_tokens=160, temperature=0)
    t0 = time.time()
    outs = llm.generate(prompts, params)
    seconds = time.time() - t0
    correct = {"+": 0, "-": 0}
    total = {"+": 0, "-": 0}
    shown = 0
    for (a, op, b), out in zip(qs, outs):
        text = out.outputs[0].text
        want = a + b if op == "+" else a - b
        ok = parse_answer(text) == want
        correct[op] += ok
        total[op] += 1
        if shown < show:
            print(f"--- {question(a, op, b)} (expected {want}, {'right' if ok else 'WRONG'})\n{text}")
            shown += 1
    weather = llm.generate("The weather today is", SamplingParams(max_tokens=24, temperature=0))[0].outputs[0].text
    n = sum(total.values())
    return {
        "total": n, "correct": sum(correct.values()), "accuracy": sum(correct.values()) / max(1, n),
        "accuracy_add": correct["+"] / max(1, total["+"]), "accuracy_sub": correct["-"] / max(1, total["-"]),
        "seconds": seconds, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs), "weather": weather,
    }
