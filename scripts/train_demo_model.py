"""Trains tokenmill's demo model: a small Llama that does 3-digit arithmetic with worked steps
and continues plain English text. Everything it learns from is generated here (no downloads,
no third-party text), and the run is reproducible from --seed.

    python scripts/train_demo_model.py --out tokenmill/demo_model

The reasoning demo family (tokenmill/demo_models/, see its README) is trained by the same
script on the chain task, with the demo model's tokenizer, choosing the checkpoint by its
validation accuracy:

    python scripts/train_demo_model.py --task chain --tokenizer tokenmill/demo_model \
        --out /tmp/chain --seq-len 512 --steps 3000 --eval-every 250

Data
- Chat: "What is 347 + 589?" / "What is 902 - 458?" (operands 0..999, several phrasings, an
  optional system message) answered digit by digit, ones place first, with carries and
  borrows written out, ending "The answer is N."; a few greetings that say what the model
  can do. Loss is on the assistant's turn only.
- English: paragraphs from a small generative grammar (weather, people, places, animals,
  food, daily routines) using real words.
- Held out: operand pairs with (1000 * a + b) % 97 == 0 never appear in training;
  `tokenmill eval-demo` tests on them (tokenmill/demo.py has the shared format code).
- --task chain: mostly chains of 3-4 operands ("What is 964 + 530 - 75 - 902?") worked one
  operation at a time (tokenmill.demo.chain_answer), each by one of the methods that differ
  for it drawn at random (left to right; the added and the subtracted numbers summed apart;
  the same with each group summed from the right), plus the
  two-operand questions and English; the test and validation chains (chain_split 0 and 1)
  never appear in training.

Tokenizer: byte-level BPE (HF `tokenizers`) with every digit its own token, plus chat
special tokens; the chat template goes into tokenizer_config.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenmill.demo import (  # noqa: E402
    BOS,
    CHAT_TEMPLATE,
    END,
    SPECIAL_TOKENS,
    arithmetic_answer,
    chain_answer,
    chain_methods,
    chain_question,
    chain_split,
    is_held_out,
    question,
    random_chain,
)

# -- English from a small grammar -------------------------------------------------------------
NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Lucy", "Mark", "Nora",
         "Oscar", "Paul", "Rosa", "Sam", "Tom", "Vera", "Will"]
PLACES = ["the park", "the market", "the library", "the school", "the station", "the beach", "the river", "the garden",
          "the museum", "the bakery", "the farm", "the forest", "the city", "the village", "the harbor", "the hill"]
TIMES = ["this morning", "in the afternoon", "after lunch", "before dinner", "on Monday", "on Sunday", "last week",
         "yesterday", "at noon", "in the evening", "early in the morning", "every Saturday"]
WEATHER = ["sunny", "cloudy", "rainy", "windy", "cold", "warm", "hot", "foggy", "bright", "grey", "mild", "stormy",
           "clear", "wet", "dry", "calm"]
WEATHER_MORE = ["and warm", "with a light breeze", "with a few clouds", "and very quiet", "with rain in the evening",
                "and a little cold", "with clear skies", "with strong winds from the west", "and pleasant",
                "but it may rain later", "with snow on the hills", "and the air feels fresh"]
WEATHER_THEN = ["so we will walk to {place}", "so the children will play outside", "so {name} will stay at home",
                "so it is a good day for a picnic", "so take an umbrella when you go out",
                "so the farmers are happy", "so many people are at {place}", "so {name} will read a book inside",
                "so we will have lunch in the garden", "so the roads are busy"]
ANIMALS = ["cat", "dog", "horse", "bird", "fox", "rabbit", "cow", "duck", "sheep", "mouse", "owl", "goat"]
ANIMAL_VERBS = ["sleeps", "runs", "plays", "waits", "sits", "walks", "hides", "eats"]
PREPS = ["near", "under", "behind", "beside", "in front of", "next to"]
THINGS = ["the tree", "the door", "the table", "the fence", "the window", "the house", "the old barn", "the bridge"]
FOODS = ["apples", "bread", "cheese", "oranges", "eggs", "tomatoes", "rice", "carrots", "cakes", "fish", "milk",
         "potatoes"]
ADJ = ["small", "big", "old", "new", "quiet", "busy", "beautiful", "friendly", "long", "short", "happy", "tired"]
JOBS = ["teacher", "doctor", "farmer", "baker", "driver", "painter", "writer", "nurse", "cook", "gardener"]
VERBS_PAST = ["visited", "walked to", "went to", "drove to", "looked for a book at", "met a friend at",
              "cleaned", "painted a picture of"]
FEELINGS = ["happy", "tired", "excited", "calm", "surprised", "hungry", "proud", "curious"]
ACTIVITIES = ["reads a book", "drinks tea", "writes a letter", "cooks dinner", "plays the piano", "goes for a walk",
              "works in the garden", "listens to music", "calls a friend", "makes bread"]


def _sentence(rng: random.Random) -> str:
    name, name2 = rng.sample(NAMES, 2)
    place, time_ = rng.choice(PLACES), rng.choice(TIMES)
    k = rng.randrange(12)
    if k == 0:
        s = f"the weather today is {rng.choice(WEATHER)} {rng.choice(WEATHER_MORE)}"
        if rng.random() < 0.6:
            s += ", " + rng.choice(WEATHER_THEN).format(place=place, name=name)
        return s
    if k == 1:
        return f"{name} {rng.choice(VERBS_PAST)} {place} {time_}"
    if k == 2:
        return f"the {rng.choice(ANIMALS)} {rng.choice(ANIMAL_VERBS)} {rng.choice(PREPS)} {rng.choice(THINGS)}"
    if k == 3:
        n = rng.choice(["two", "three", "four", "five", "six", "some", "many", "a few"])
        return f"{name} bought {n} {rng.choice(FOODS)} at the market {time_}"
    if k == 4:
        return f"{name} is a {rng.choice(JOBS)} who lives in a {rng.choice(ADJ)} house near {place}"
    if k == 5:
        return f"{name} and {name2} were {rng.choice(FEELINGS)} when they arrived at {place}"
    if k == 6:
        return f"every day after work, {name} {rng.choice(ACTIVITIES)}"
    if k == 7:
        return f"{place} is {rng.choice(ADJ)} and {rng.choice(ADJ)} {time_}"
    if k == 8:
        return f"it was {rng.choice(WEATHER)} {time_}, so {name} {rng.choice(ACTIVITIES).replace('s ', ' ', 1)}"
    if k == 9:
        return f"the {rng.choice(ADJ)} {rng.choice(ANIMALS)} looked at {name} and {rng.choice(ANIMAL_VERBS)[:-1]}ed"
    if k == 10:
        return f"{name} likes {rng.choice(FOODS)} more than {rng.choice(FOODS)}"
    return f"in {place}, {name} met a {rng.choice(JOBS)} named {name2}"


def _fix(s: str) -> str:
    s = s.replace("sleeped", "slept").replace("runed", "ran").replace("eated", "ate").replace("sited", "sat")
    s = s.replace("hideed", "hid").replace("waited", "waited").replace("walked", "walked")
    return s[0].upper() + s[1:] + "."


def english_paragraph(rng: random.Random) -> str:
    n = rng.randint(2, 6)
    sents = [_fix(_sentence(rng)) for _ in range(n)]
    if rng.random() < 0.3:  # the demo's favourite opening
        w = f"The weather today is {rng.choice(WEATHER)} {rng.choice(WEATHER_MORE)}"
        sents.insert(0, w + ", " + rng.choice(WEATHER_THEN).format(place=rng.choice(PLACES),
                                                                    name=rng.choice(NAMES)) + ".")
    return " ".join(sents)


GREETINGS = ["Hello", "Hi", "Hi!", "Hello!", "Hey", "Who are you?", "What can you do?", "Help", "Good morning"]
GREETING_REPLY = ("Hello! I am the tokenmill demo model. I can add and subtract whole numbers up to 999 and show my "
                  "work. Ask me something like: What is 347 + 589?")
SYSTEMS = ["You are a helpful assistant.", "You are a careful math tutor.", "Answer the question."]


def chat_example(rng: random.Random, chain_frac: float = 0.0) -> list[dict[str, str]]:
    msgs = []
    if rng.random() < 0.15:
        msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
    if rng.random() < chain_frac:
        while True:
            nums, ops = random_chain(rng)
            if chain_split(nums) > 1:  # 0 and 1: the test and validation sets
                break
        return msgs + [{"role": "user", "content": chain_question(nums, ops, rng)},
                       {"role": "assistant", "content": chain_answer(nums, ops, rng.choice(chain_methods(nums, ops)))}]
    if rng.random() < 0.02:
        msgs += [{"role": "user", "content": rng.choice(GREETINGS)},
                 {"role": "assistant", "content": GREETING_REPLY}]
        return msgs
    while True:
        a = _operand(rng)
        b = _operand(rng)
        if not is_held_out(a, b):
            break
    op = rng.choice("+-")
    msgs += [{"role": "user", "content": question(a, op, b, rng)},
             {"role": "assistant", "content": arithmetic_answer(a, op, b)}]
    return msgs


def _operand(rng: random.Random) -> int:
    digits = rng.choices([1, 2, 3], weights=[1, 2, 5])[0]
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


# -- tokenizer --------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int, out: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),  # digit-level arithmetic needs one token per digit
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=END, pad_token=SPECIAL_TOKENS[0],
                                   unk_token=None)
    fast.save_pretrained(out)
    # The chat template lives in tokenizer_config.json (where every transformers version looks).
    cfg_path = os.path.join(out, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["add_bos_token"] = False
    # transformers 5 writes its own class name; 4.x only knows PreTrainedTokenizerFast (5.x maps it).
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    jinja = os.path.join(out, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out)


# -- training data ----------------------------------------------------------------------------
def encode_example(tok, rng: random.Random, english_frac: float, chain_frac: float = 0.0
                   ) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 loss mask for one example (BOS ... END)."""
    bos, end = tok.convert_tokens_to_ids(BOS), tok.convert_tokens_to_ids(END)
    if rng.random() < english_frac:
        ids = [bos] + tok.encode(english_paragraph(rng), add_special_tokens=False) + [end]
        return ids, [0] + [1] * (len(ids) - 1)
    msgs = chat_example(rng, chain_frac)
    ids, mask = [bos], [0]
    for m in msgs:
        head = tok.encode(f"<|{m['role']}|>\n", add_special_tokens=False)
        body = tok.encode(m["content"], add_special_tokens=False) + [end]
        nl = tok.encode("\n", add_special_tokens=False)
        learn = 1 if m["role"] == "assistant" else 0
        ids += head + body + nl
        mask += [0] * len(head) + [learn] * len(body) + [0] * len(nl)
    return ids, mask


def batches(tok, rng: random.Random, batch: int, seq_len: int, english_frac: float, chain_frac: float = 0.0):
    """Packs examples into [batch, seq_len + 1] rows, forever."""
    buf_ids: list[int] = []
    buf_mask: list[int] = []
    need = batch * (seq_len + 1)
    while True:
        while len(buf_ids) < need:
            ids, mask = encode_example(tok, rng, english_frac, chain_frac)
            buf_ids += ids
            buf_mask += mask
        x = torch.tensor(buf_ids[:need]).view(batch, seq_len + 1)
        m = torch.tensor(buf_mask[:need]).view(batch, seq_len + 1)
        buf_ids, buf_mask = buf_ids[need:], buf_mask[need:]
        yield x, m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="tokenmill/demo_model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--english-frac", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--task", choices=["demo", "chain"], default="demo",
                   help="chain: the reasoning family's mix (chains 85%% of chats, English 10%%)")
    p.add_argument("--tokenizer", help="reuse this folder's tokenizer (the family shares the demo model's)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="chain: save a checkpoint and print its greedy validation accuracy every N steps")
    p.add_argument("--eval-questions", type=int, default=200)
    p.add_argument("--intermediate", type=int, default=0, help="MLP width (0: 8/3 of hidden, rounded to 64)")
    args = p.parse_args()
    chain_frac = 0.85 if args.task == "chain" else 0.0
    if args.task == "chain" and args.english_frac == 0.25:
        args.english_frac = 0.10

    from transformers import LlamaConfig, LlamaForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    rng = random.Random(args.seed)
    corpus = []
    for _ in range(20000):
        if rng.random() < 0.5:
            corpus.append(english_paragraph(rng))
        else:
            corpus.append("\n".join(m["content"] for m in chat_example(rng)))
    if args.tokenizer:
        import shutil

        from transformers import AutoTokenizer

        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(args.tokenizer, f), os.path.join(args.out, f))
        tok = AutoTokenizer.from_pretrained(args.out)
    else:
        tok = train_tokenizer(corpus, args.vocab, args.out)
    print(f"tokenizer: {len(tok)} tokens ({time.time() - t0:.0f}s)", flush=True)

    vocab = (len(tok) + 63) // 64 * 64
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden,
        intermediate_size=args.intermediate or int(args.hidden * 8 / 3 + 63) // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tok.convert_tokens_to_ids(BOS), eos_token_id=tok.convert_tokens_to_ids(END),
        pad_token_id=tok.convert_tokens_to_ids(SPECIAL_TOKENS[0]), initializer_range=0.02,
    )
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}",
          flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    warmup = max(1, args.steps // 30)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    data = batches(tok, random.Random(args.seed + 1), args.batch, args.seq_len, args.english_frac, chain_frac)
    model.train()
    t_train = time.time()
    ema = None
    for step in range(args.steps):
        x, m = next(data)
        inputs, targets = x[:, :-1], x[:, 1:].clone()
        targets[m[:, 1:] == 0] = -100
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            tok_s = (step + 1) * args.batch * args.seq_len / el
            print(f"step {step:5d}  loss {ema:.4f}  lr {lr_at(step):.2e}  {tok_s:.0f} tok/s  {el / 60:.1f} min",
                  flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            save(model, os.path.join(args.out, "checkpoints", f"step-{step + 1}"), args.out, args.eval_questions)
            model.train()

    model.eval()
    model.save_pretrained(args.out)
    model.generation_config.save_pretrained(args.out)
    if args.task == "chain":
        print(f"final: {validation(args.out, args.eval_questions)}", flush=True)
    with open(os.path.join(args.out, "TRAINING.md"), "w") as f:
        f.write(f"Trained by scripts/train_demo_model.py with: {' '.join(sys.argv[1:]) or '(defaults)'}\n\n"
                f"{n_params / 1e6:.2f}M parameters, {args.steps} steps of {args.batch}x{args.seq_len} tokens, "
                f"seed {args.seed}, final loss (EMA) {ema:.4f}, {(time.time() - t0) / 60:.1f} minutes.\n")
    print(f"saved to {args.out} in {(time.time() - t0) / 60:.1f} min", flush=True)


def validation(path: str, num: int) -> str:
    """Greedy accuracy on the validation chains (split 1), with tokenmill itself."""
    from tokenmill.demo import evaluate_chain
    from tokenmill.llm import LLM

    r = evaluate_chain(LLM(path, dtype="float32"), num, split=1)
    return f"validation accuracy {r['accuracy']:.1%} ({r['correct']}/{r['total']}, {r['seconds']:.0f}s)"


def save(model, path: str, tokenizer_dir: str, num: int) -> None:
    """A checkpoint that loads on its own, and its validation accuracy."""
    import shutil

    model.eval()
    model.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, f), os.path.join(path, f))
    print(f"checkpoint {path}: {validation(path, num)}", flush=True)


if __name__ == "__main__":
    main()
