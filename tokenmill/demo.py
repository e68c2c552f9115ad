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


def _digits(n: int, places: int = 3) -> list[int]:
    return [(n // 10**i) % 10 for i in range(places)]  # ones first


def _add_steps(a: int, b: int, places: int = 3) -> list[str]:
    da, db = _digits(a, places), _digits(b, places)
    carry, lines = 0, []
    for i in range(places):
        total = da[i] + db[i] + carry
        expr = f"{da[i]} + {db[i]}" + (f" + {carry}" if carry else "")
        line = f"{PLACES[i]}: {expr} = {total}, write {total % 10}"
        carry = total // 10
        lines.append(line + (", carry 1." if carry else "."))
    if carry:
        lines.append("Thousands: carry 1, write 1.")
    return lines


def _sub_steps(a: int, b: int, places: int = 3) -> list[str]:
    """a >= b."""
    da, db = _digits(a, places), _digits(b, places)
    borrow, lines = 0, []
    for i in range(places):
        expr = f"{da[i]} - {db[i]}" + (f" - {borrow}" if borrow else "")
        value = da[i] - db[i] - borrow
        if value < 0:
            lines.append(f"{PLACES[i]}: 10 + {expr} = {value + 10}, write {value + 10}, borrow 1.")
            borrow = 1
        else:
            lines.append(f"{PLACES[i]}: {expr} = {value}, write {value}.")
            borrow = 0
    return lines


# -- the chain task: 3-4 operands, a worked step per operation -------------------------------
# The reasoning demo family (tokenmill/demo_models/) learns it. A chain keeps its running total
# within 0..9999, so every step is one of the digit-by-digit additions or subtractions above,
# over four places once the total reaches 1000. Chains with chain_split(...) == 0 are held out
# of training (the test set), == 1 too (the validation set that picks a checkpoint).
def chain_split(nums: list[int]) -> int:
    h = 0
    for n in nums:
        h = (h * 1009 + n) % 1_000_003
    return h % 53


def random_chain(rng: random.Random, operands: int | None = None) -> tuple[list[int], list[str]]:
    """Operands (each 1-3 digits) and operators of a chain whose running total stays in 0..9999."""
    k = operands or rng.choice([3, 4])
    nums = [rng.randrange(100, 1000)]
    ops: list[str] = []
    total = nums[0]
    for _ in range(k - 1):
        digits = rng.choices([1, 2, 3], weights=[1, 2, 6])[0]
        b = rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)
        op = rng.choice("+-") if total >= b else "+"
        nums.append(b)
        ops.append(op)
        total = total + b if op == "+" else total - b
    return nums, ops


def chain_question(nums: list[int], ops: list[str], rng: random.Random | None = None) -> str:
    expr = " ".join([str(nums[0])] + [f"{op} {b}" for op, b in zip(ops, nums[1:])])
    forms = [f"What is {expr}?"] * 4 + [f"Compute {expr}.", f"Calculate {expr}.", f"what is {expr}"]
    return rng.choice(forms) if rng is not None else forms[0]


def chain_value(nums: list[int], ops: list[str]) -> int:
    total = nums[0]
    for op, b in zip(ops, nums[1:]):
        total = total + b if op == "+" else total - b
    return total


CHAIN_METHODS = ("in_order", "grouped", "reversed")
_CHAIN_HEADERS = {
    "in_order": "Let's go left to right.",
    "grouped": "Let's add what is added, subtract what is subtracted, then take the difference.",
    "reversed": "Let's add from the right.",
}


def chain_answer(nums: list[int], ops: list[str], method: str = "in_order") -> str:
    """The worked answer, each operation digit by digit, by one of three methods (sampled paths that
    take different methods make different mistakes, which a vote can then outweigh):
    - in_order: left to right, each result carried into the next operation;
    - grouped: the numbers added summed first, then the numbers subtracted, then one subtraction;
    - reversed: as grouped, but each group summed from its last number to its first.
    What is left to compute is written out before every step ("Left: 1007 + 347 - 641.",
    "Added: ...", "Subtracted: ..."), so each step copies its numbers from the line above rather
    than finding them in the question: a small model's weak spot is that long-range lookup.
    chain_methods() says which methods take different steps for a chain."""
    lines = [_CHAIN_HEADERS[method]]
    k = 0

    def step(a: int, op: str, b: int) -> int:
        nonlocal k
        k += 1
        lines.extend(_chain_step(k, a, op, b))
        return a + b if op == "+" else a - b

    if method == "in_order":
        total, rest = nums[0], list(zip(ops, nums[1:]))
        while rest:
            lines.append("Left: " + " ".join([str(total)] + [f"{op} {b}" for op, b in rest]) + ".")
            (op, b), rest = rest[0], rest[1:]
            total = step(total, op, b)
    elif method in ("grouped", "reversed"):
        plus = [nums[0]] + [b for op, b in zip(ops, nums[1:]) if op == "+"]
        minus = [b for op, b in zip(ops, nums[1:]) if op == "-"]
        if method == "reversed":
            plus, minus = plus[::-1], minus[::-1]
        groups = [("Added", plus)] + ([("Subtracted", minus)] if minus else [])
        lines.append(" ".join(f"{name}: {' + '.join(map(str, g))}." for name, g in groups))
        sums = []
        for name, g in groups:
            while len(g) > 1:
                g = [step(g[0], "+", g[1])] + g[2:]
                if len(g) > 1:
                    lines.append(f"{name}: {' + '.join(map(str, g))}.")
            sums.append(g[0])
        if minus:
            lines.append(f"Left: {sums[0]} - {sums[1]}.")
            step(sums[0], "-", sums[1])
    else:
        raise ValueError(f"method: one of {CHAIN_METHODS}, got {method!r}")
    lines.append(f"The answer is {chain_value(nums, ops)}.")
    return "\n".join(lines)


def chain_methods(nums: list[int], ops: list[str]) -> list[str]:
    """The methods whose operations (their "Step" lines) differ for this chain, in CHAIN_METHODS
    order: pure additions of two numbers have one, a chain like 5 + 7 - 2 two."""
    out, seen = [], []
    for m in CHAIN_METHODS:
        steps = [line for line in chain_answer(nums, ops, m).splitlines() if line.startswith("Step ")]
        if steps not in seen:
            seen.append(steps)
            out.append(m)
    return out


def _chain_step(k: int, a: int, op: str, b: int) -> list[str]:
    places = 4 if max(a, b) >= 1000 else 3
    lines = [f"Step {k}: {a} {op} {b}."]
    lines += _add_steps(a, b, places) if op == "+" else _sub_steps(a, b, places)
    lines.append(f"So {a} {op} {b} = {a + b if op == '+' else a - b}.")
    return lines


def chain_questions(num: int, split: int = 0, seed: int = 1234) -> list[tuple[list[int], list[str]]]:
    """num chains of one held-out split (0: test, 1: validation), half of 3 and half of 4 operands."""
    rng = random.Random(seed)
    out: list[tuple[list[int], list[str]]] = []
    while len(out) < num:
        nums, ops = random_chain(rng, 3 + len(out) % 2)
        if chain_split(nums) == split:
            out.append((nums, ops))
    return out


def evaluate_chain(llm, num_questions: int = 200, split: int = 0, max_tokens: int = 512) -> dict:
    """Greedy accuracy on held-out chains, in one batch."""
    import time

    from tokenmill.sampling_params import SamplingParams

    qs = chain_questions(num_questions, split)
    prompts = [llm.chat_prompt([{"role": "user", "content": chain_question(n, o)}]) for n, o in qs]
    t0 = time.time()
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    correct = sum(parse_answer(o.outputs[0].text) == chain_value(n, ops) for (n, ops), o in zip(qs, outs))
    return {"total": len(qs), "correct": correct, "accuracy": correct / max(1, len(qs)),
            "seconds": time.time() - t0, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


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
