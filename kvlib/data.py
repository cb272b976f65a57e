"""The embedded reasoning task, its splits, the GSM8K-format loader, and the data stage (``prepare_data``).

An ``Example`` is a question, a chain of thought and an integer answer. Its ``text`` is
``"Q: {question}\\nA: {reasoning}\\n#### {answer}"``, and ``spans`` gives the character ranges of its three
segments (prompt / reasoning / answer), which segment-aware time alignment resamples separately.

The generator writes grade-school word problems that tiny models trained for minutes on a CPU can partly
learn: operands in ``[2, max_operand]``, every intermediate and final result a non-negative integer below
1000, division only when exact, 2-4 operations per problem. Two task kinds:

- ``chain``: one quantity transformed step by step (buy, lose, multiply, share out);
- ``compare``: people's amounts defined relative to each other, then a difference or a total; or a count
  of the listed numbers above / below a threshold.

and two chain-of-thought styles with the same arithmetic:

- ``equation``: GSM8K-style calculator annotations only, ``<<5+3=8>> <<8*2=16>>``;
- ``natural``: short sentences with the arithmetic inline, ``Adding 3 gives 5+3=8.``

Every ``a op b=c`` in a reasoning holds in integer arithmetic. A comparison is written like a calculator
would, ``8>6=1`` and ``3>6=0`` (1 for true), and a count is the sum of those, ``0+1+1=2``. The last result
is the answer. The number of operations is the number of equations.

Notable choices:

- the question alone determines the problem, and questions are pairwise distinct across all generated
  splits: one pool is drawn, then cut into consecutive pieces, so no question appears in two splits;
- examples are drawn in a fixed cycle over (task, style), so every prefix, and so every split, holds them
  in equal shares (shuffle before training);
- a split's hash is the sha256 of exactly the bytes ``save_jsonl`` writes.

GSM8K (Cobbe et al. 2021, https://arxiv.org/abs/2110.14168): one JSON object per line with ``question`` and
``answer``, the answer being the worked solution (with ``<<48/2=24>>`` annotations) then ``#### 72``.
The loaders read UTF-8 only and name file and line of any bad line (a byte that is not UTF-8, invalid JSON, a
final answer that is no integer); a comma in a number is a thousands separator only (``1,000``, not ``1,00``);
a GSM8K file without any example is refused, never read as an empty split.

The data stage (``prepare_data``) writes the splits ``SPLITS``. Each is generated, or, when ``files`` names
it, read whole from a GSM8K-format file (real training data as well as a real test set), its worked
solution becoming the reasoning. A split read from a file is taken as it is: its size in ``sizes`` must
equal its number of examples (a mismatch is refused, never silently cut or padded), so the sizes in the
params are the sizes of the run. Only the splits not read from a file are generated, from one pool in
``SPLITS`` order. Two splits may not share a file, nor a question (compared after Unicode NFKC
normalisation, case folding and collapsing whitespace): a test question among the training data would
leak the test. ``splits.json`` records for each split its size, sha256, tasks and source (the file's path
as given and the sha256 of its bytes, or the generator's seed and max_operand).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from kvlib.files import write_json, write_text

SEGMENTS = ("prompt", "reasoning", "answer")
TASKS = ("chain", "compare")
STYLES = ("equation", "natural")
MAX_REDRAWS = 1000  # draws in a row that repeat earlier questions before generate gives up

NAMES = (
    ("Tom", "he"), ("Ann", "she"), ("Ben", "he"), ("Eva", "she"), ("Max", "he"), ("Mia", "she"), ("Leo", "he"),
    ("Zoe", "she"), ("Sam", "he"), ("Ivy", "she"), ("Dan", "he"), ("Amy", "she"), ("Raj", "he"), ("Kim", "she"),
    ("Joe", "he"), ("Lea", "she"), ("Omar", "he"), ("Nia", "she"), ("Ken", "he"), ("Liz", "she"),
)  # fmt: skip
OBJECTS = ("apples", "stamps", "marbles", "cards", "pencils", "coins", "stickers", "books", "shells", "cookies")

CHAIN_STARTS = ("{name} has {a} {obj}.", "{name} starts with {a} {obj}.", "{name} owns {a} {obj}.")
CHAIN_STEPS = {
    "+": ("buys {b} more", "finds {b} more", "gets {b} more", "wins {b} more"),
    "-": ("gives away {b}", "loses {b}", "sells {b}", "uses {b}"),
    "*": ("ends up with {b} times as many", "multiplies them by {b}"),
    "/": ("splits them into {b} equal piles and keeps one", "keeps one of {b} equal shares"),
}
CHAIN_JOINS = (", then ", ". Then {pron} ", ". Next {pron} ")
CHAIN_QUESTIONS = (
    "How many {obj} does {name} have now?",
    "How many {obj} does {name} end up with?",
    "How many {obj} does {name} have in the end?",
)
NATURAL_STEPS = {
    "+": "Adding {b} gives {eq}.",
    "-": "Taking away {b} leaves {eq}.",
    "*": "Times {b} gives {eq}.",
    "/": "Splitting into {b} gives {eq}.",
}

HAVE = (("has", "have"), ("owns", "own"), ("collects", "collect"))  # (singular, plural)
RELATIONS = {"+": "{b} more than", "-": "{b} fewer than", "*": "{b} times as many as"}
FRACTIONS = {2: "half as many as", 3: "a third as many as", 4: "a quarter as many as"}
DIFFERENCE_QUESTIONS = (
    "How many {more} {obj} does {p} {have} than {q}?",
    "How many {more} {obj} than {q} does {p} {have}?",
)
TOTAL_QUESTIONS = ("How many {obj} do they {have} together?", "How many {obj} do they {have} in total?")
COUNT_WORDS = {">": ("more than", "above", "over"), "<": ("less than", "below", "under")}
COUNT_QUESTIONS = (
    "How many of {nums} are {cmp} {t}?",
    "Of the numbers {nums}, how many are {cmp} {t}?",
    "{name} scores {nums} points in {k} games. In how many games is the score {cmp} {t}?",
    "{name} has {k} bags with {nums} {obj}. How many bags hold {cmp} {t} {obj}?",
)
NUMBER_WORDS = {2: "two", 3: "three"}


@dataclass(frozen=True)
class Example:
    """One problem. ``id`` is unique and stable; ``answer`` a canonical integer string ("72", "-3")."""

    id: str
    task: str  # "chain" | "compare" | "gsm8k"
    style: str  # "equation" | "natural" | "gsm8k"
    question: str
    reasoning: str  # the chain of thought, no leading or trailing whitespace
    answer: str

    def __post_init__(self):
        if not isinstance(self.answer, str) or _canonical(self.answer) != self.answer:
            raise ValueError(f"answer must be a canonical integer string like '72' or '-3', got {self.answer!r}")

    @property
    def prompt(self) -> str:
        return f"Q: {self.question}\nA:"

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.reasoning}\n#### {self.answer}"

    @property
    def spans(self) -> dict[str, tuple[int, int]]:
        """Character ``[start, end)`` of each segment of ``text``: contiguous, in SEGMENTS order, covering it."""
        p = len(self.prompt)
        r = p + len(self.reasoning) + 2  # " {reasoning}\n"
        return {"prompt": (0, p), "reasoning": (p, r), "answer": (r, r + 5 + len(self.answer))}


# The generator. A draw returns (question, {style: reasoning}, answer).


def _apply(x: int, op: str, b: int) -> int:
    match op:
        case "+":
            return x + b
        case "-":
            return x - b
        case "*":
            return x * b
        case "/":
            assert x % b == 0, f"{x}/{b} is not exact"
            return x // b
        case ">":
            return int(x > b)
        case "<":
            return int(x < b)


def _step(rng: random.Random, x: int, max_operand: int, divisors: range) -> tuple[str, int]:
    """A random operation (op, operand) on x whose result is a whole number in [1, 999]."""
    options = []
    if x + 2 <= 999:
        options.append(("+", range(2, min(max_operand, 999 - x) + 1)))
    if x >= 3:
        options.append(("-", range(2, min(max_operand, x - 1) + 1)))
    if 2 * x <= 999:
        options.append(("*", range(2, min(max_operand, 999 // x) + 1)))
    exact = [b for b in divisors if x % b == 0]
    if exact:
        options.append(("/", exact))
    op, operands = rng.choice(options)
    return op, rng.choice(operands)


def _render(eqs: list[str], sentences: list[str]) -> dict[str, str]:
    return {"equation": " ".join(f"<<{eq}>>" for eq in eqs), "natural": " ".join(sentences)}


def _chain(rng: random.Random, max_operand: int) -> tuple[str, dict[str, str], str]:
    """Tom has 5 apples. He buys 3 more, then doubles them ... How many apples does Tom have now?"""
    (name, pron), obj = rng.choice(NAMES), rng.choice(OBJECTS)
    x = start = rng.randint(2, max_operand)
    eqs, phrases, sentences = [], [], []
    for _ in range(rng.choice((2, 3, 4))):
        op, b = _step(rng, x, max_operand, range(2, max_operand + 1))
        y = _apply(x, op, b)
        eqs.append(f"{x}{op}{b}={y}")
        phrases.append(rng.choice(CHAIN_STEPS[op]).format(b=b))
        sentences.append(NATURAL_STEPS[op].format(b=b, eq=eqs[-1]))
        x = y
    join = rng.choice(CHAIN_JOINS).format(pron=pron)
    question = " ".join(
        [
            rng.choice(CHAIN_STARTS).format(name=name, a=start, obj=obj),
            f"{pron.capitalize()} {join.join(phrases)}.",
            rng.choice(CHAIN_QUESTIONS).format(name=name, obj=obj),
        ]
    )
    return question, _render(eqs, sentences), str(x)


def _relations(rng: random.Random, max_operand: int, people: int, total: bool) -> tuple[str, dict[str, str], str]:
    """Ann has 12 stamps. Ben has 7 more than Ann. ... then a difference (first vs last) or a total."""
    names = [name for name, _ in rng.sample(NAMES, people)]
    obj, (has, have) = rng.choice(OBJECTS), rng.choice(HAVE)
    while True:  # redraw the numbers until the difference is not zero / the total stays below 1000
        values, steps = [rng.randint(2, max_operand)], []
        for _ in range(people - 1):
            steps.append(_step(rng, values[-1], max_operand, range(2, min(4, max_operand) + 1)))
            values.append(_apply(values[-1], *steps[-1]))
        if sum(values) <= 999 if total else values[0] != values[-1]:
            break
    parts = [f"{names[0]} {has} {values[0]} {obj}"]
    eqs, sentences = [], []
    for i, (op, b) in enumerate(steps):
        relation = FRACTIONS[b] if op == "/" else RELATIONS[op].format(b=b)
        parts.append(f"{names[i + 1]} {has} {relation} {names[i]}")
        eqs.append(f"{values[i]}{op}{b}={values[i + 1]}")
        sentences.append(f"{names[i + 1]} has {eqs[-1]}.")
    facts = ". ".join(parts) + "." if rng.random() < 0.5 else ", ".join(parts[:-1]) + f", and {parts[-1]}."
    if total:
        question = rng.choice(TOTAL_QUESTIONS).format(obj=obj, have=have)
        sums, acc = [], values[0]
        for v in values[1:]:
            sums.append(f"{acc}+{v}={acc + v}")
            acc += v
        eqs += sums
        sentences.append(f"Together: {', '.join(sums)}.")
        answer = acc
    else:
        p, q = rng.choice(((0, -1), (-1, 0)))  # who is asked about, compared with whom
        more = "more" if values[p] > values[q] else "fewer"
        big, small = max(values[0], values[-1]), min(values[0], values[-1])
        question = rng.choice(DIFFERENCE_QUESTIONS).format(more=more, obj=obj, p=names[p], have=have, q=names[q])
        eqs.append(f"{big}-{small}={big - small}")
        sentences.append(f"The difference is {eqs[-1]}.")
        answer = big - small
    return f"{facts} {question}", _render(eqs, sentences), str(answer)


def _count(rng: random.Random, max_operand: int, k: int) -> tuple[str, dict[str, str], str]:
    """How many of 3, 8 and 12 are more than 6?  <<3>6=0>> <<8>6=1>> <<12>6=1>> <<0+1+1=2>>"""
    (name, _), obj = rng.choice(NAMES), rng.choice(OBJECTS)
    values = [rng.randint(2, max_operand) for _ in range(k)]
    t, op = rng.randint(min(values), max(values)), rng.choice("<>")  # a threshold within the values' range
    nums = ", ".join(map(str, values[:-1])) + f" and {values[-1]}"
    question = rng.choice(COUNT_QUESTIONS).format(
        nums=nums, cmp=rng.choice(COUNT_WORDS[op]), t=t, name=name, obj=obj, k=NUMBER_WORDS[k]
    )
    flags = [_apply(v, op, t) for v in values]
    checks = [f"{v}{op}{t}={f}" for v, f in zip(values, flags)]
    total = f"{'+'.join(map(str, flags))}={sum(flags)}"
    natural = f"Checking: {', '.join(checks[:-1])} and {checks[-1]}, so the count is {total}."
    return question, _render([*checks, total], [natural]), str(sum(flags))


def _compare(rng: random.Random, max_operand: int) -> tuple[str, dict[str, str], str]:
    """2-4 operations: relations + difference (2-4), relations + total (2 or 4), or a count of 2-3 numbers (3-4)."""
    n_ops = rng.choice((2, 3, 4))
    kind = rng.choice(
        {2: ("difference", "total"), 3: ("difference", "count"), 4: ("difference", "total", "count")}[n_ops]
    )
    match kind:
        case "difference":
            return _relations(rng, max_operand, people=n_ops, total=False)
        case "total":
            return _relations(rng, max_operand, people=n_ops // 2 + 1, total=True)
        case "count":
            return _count(rng, max_operand, k=n_ops - 1)


DRAW = {"chain": _chain, "compare": _compare}


def generate(n: int, seed: int, tasks=TASKS, styles=STYLES, max_operand: int = 20) -> list[Example]:
    """n examples with pairwise distinct questions, deterministic from seed.

    Example ``i`` has the ``i % (len(tasks) * len(styles))``-th (task, style) pair, so the pairs come in
    equal shares; its id is ``f"{task}-{i:05d}"``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for name, given, known in (("tasks", tasks, TASKS), ("styles", styles, STYLES)):
        if not given or not set(given) <= set(known):
            raise ValueError(f"{name} must be a non-empty selection of {known}, got {given!r}")
    if not 2 <= max_operand <= 100:
        raise ValueError(f"max_operand must be in [2, 100] so that operands stay small, got {max_operand}")
    rng = random.Random(seed)
    cells = [(task, style) for task in tasks for style in styles]
    seen, examples = set(), []
    for i in range(n):
        task, style = cells[i % len(cells)]
        for _ in range(MAX_REDRAWS):
            question, reasoning, answer = DRAW[task](rng, max_operand)
            if question not in seen:
                break
        else:
            raise ValueError(
                f"asked for {n} distinct questions but found only {i}: {MAX_REDRAWS} {task!r} draws in a row repeated "
                f"earlier questions (max_operand={max_operand}); ask for fewer examples or raise max_operand"
            )
        seen.add(question)
        examples.append(Example(f"{task}-{i:05d}", task, style, question, reasoning[style], answer))
    return examples


def make_splits(sizes: dict[str, int], seed: int, **generate_kwargs) -> dict[str, list[Example]]:
    """Disjoint splits ``{name: examples}``: one pool of ``sum(sizes)`` distinct questions, cut in order."""
    if not sizes or any(not isinstance(v, int) or v < 0 for v in sizes.values()):
        raise ValueError(f"sizes must map split names to counts >= 0, e.g. {{'train': 100}}, got {sizes}")
    pool = generate(sum(sizes.values()), seed, **generate_kwargs)
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name] = pool[start : start + size]
        start += size
    return splits


# Files.


def _jsonl(examples: list[Example]) -> str:
    return "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in examples)


def split_sha256(examples: list[Example]) -> str:
    """sha256 (hex) of the split's canonical JSONL: exactly the bytes save_jsonl writes."""
    return hashlib.sha256(_jsonl(examples).encode("utf-8")).hexdigest()


def save_jsonl(examples: list[Example], path: str | Path) -> None:
    """Write one JSON object per example and line, atomically (temp file in the same folder, then rename)."""
    write_text(path, _jsonl(examples))


def _read_jsonl(path: str | Path):
    """(line number, object) for each non-blank line; line numbers count from 1. The file must be UTF-8."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
                    f"re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path}"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected one JSON object per line, got {type(obj).__name__}")
            yield lineno, obj


def load_jsonl(path: str | Path) -> list[Example]:
    """Read examples written by save_jsonl."""
    keys = [f.name for f in fields(Example)]
    examples = []
    for lineno, obj in _read_jsonl(path):
        missing, unknown = sorted(set(keys) - set(obj)), sorted(set(obj) - set(keys))
        if missing or unknown:
            raise ValueError(
                f"{path}:{lineno}: missing keys {missing}, unknown keys {unknown}; an example line has exactly {keys}"
            )
        try:
            examples.append(Example(**obj))
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
    return examples


def load_gsm8k(path: str | Path) -> list[Example]:
    """Read a GSM8K-format JSONL (``question``, ``answer`` = solution + ``#### n``); ids ``gsm8k-<line>``."""
    examples = []
    for lineno, obj in _read_jsonl(path):
        bad = [k for k in ("question", "answer") if not isinstance(obj.get(k), str)]
        if bad:
            raise ValueError(
                f"{path}:{lineno}: keys {bad} are missing or not strings; GSM8K lines hold "
                f"'question' and 'answer' strings, got keys {sorted(obj)}"
            )
        reasoning, sep, final = obj["answer"].partition("####")
        if not sep:
            raise ValueError(
                f"{path}:{lineno}: the answer has no '####' before its final number: ...{obj['answer'][-60:]!r}"
            )
        answer = _canonical(final.strip())
        if answer is None:
            raise ValueError(
                f"{path}:{lineno}: the final answer {final.strip()!r} after '####' is not an integer (a thousands "
                "separator groups exactly three digits: 1,000 or 12,345,678); correct that line"
            )
        examples.append(
            Example(f"gsm8k-{lineno}", "gsm8k", "gsm8k", obj["question"].strip(), reasoning.strip(), answer)
        )
    if not examples:
        raise ValueError(f"{path} holds no GSM8K example (it is empty or blank); point data.files at a GSM8K JSONL")
    return examples


# Answers.

_INTEGER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)")  # commas only as thousands separators
_FINAL = re.compile(r" *(-?\d+(?:,\d+)*)(\.\d)?")  # digits and comma-joined digit groups, then a decimal?


def _canonical(s: str) -> str | None:
    """The canonical form of an integer string ("1,234" -> "1234", "-03" -> "-3"); None if s is not one.

    A comma must separate groups of exactly three digits: "1,00" and "1234,567" are not integers."""
    return str(int(s.replace(",", ""))) if _INTEGER.fullmatch(s) else None


def parse_answer(generated: str) -> str | None:
    """The canonical integer after the first ``#### `` in generated text (thousands separators removed,
    anything after the number ignored); None when there is no ``#### `` or no integer right after it (a decimal
    or a badly grouped number such as "1,00" counts as none)."""
    start = generated.find("#### ")
    m = _FINAL.match(generated, start + 5) if start >= 0 else None
    return None if m is None or m.group(2) else _canonical(m.group(1))


SPLITS = ("teacher_train", "student_train", "validation", "test")


def _normalised(question: str) -> str:
    """The form in which questions of two splits are compared: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", question).casefold().split())


def _read_files(files: dict, root: Path) -> tuple[dict[str, list[Example]], dict[str, dict]]:
    """The splits ``files`` names, read: split -> examples and split -> source; every path is checked first."""
    unknown = sorted(set(files) - set(SPLITS))
    if unknown:
        raise ValueError(f"files names unknown splits {unknown}; name splits of {list(SPLITS)}")
    seen = {}  # resolved path -> split
    for split, given in files.items():
        if not isinstance(given, str) or not given:
            raise ValueError(
                f"files.{split} must be the path of a GSM8K-format JSONL, got {given!r}; "
                "give a path, or leave the split out of files to generate it"
            )
        path = (root / given).resolve()
        if not path.is_file():
            raise ValueError(f"files.{split}: {path} is no file; put the GSM8K-format JSONL there or fix the path")
        if path in seen:
            raise ValueError(
                f"files.{seen[path]} and files.{split} are the same file {path}; give each split its own file "
                "(cut the GSM8K file into disjoint parts first)"
            )
        seen[path] = split
    examples, sources = {}, {}
    for split, given in files.items():
        with open(root / given, "rb") as f:
            sources[split] = {"file": given, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
        examples[split] = load_gsm8k(root / given)
    return examples, sources


def _where(split: str, e: Example, source: dict) -> str:
    """``file:line (split)`` of an example read from a file, else its generated split and id."""
    if "file" in source:
        return f"{source['file']}:{e.id.removeprefix('gsm8k-')} ({split})"
    return f"the generated {split} split ({e.id})"


def _refuse_shared_questions(splits: dict[str, list[Example]], sources: dict[str, dict]) -> None:
    """ValueError naming the first question (normalised) that two splits share, and where each holds it."""
    first = {}  # normalised question -> (split, example) that holds it first
    for split, examples in splits.items():
        for e in examples:
            other, seen = first.setdefault(_normalised(e.question), (split, e))
            if other != split:
                raise ValueError(
                    f"the question {e.question!r} is in {_where(other, seen, sources[other])} and in "
                    f"{_where(split, e, sources[split])}; a question in two splits leaks one into the other "
                    "(a test question among the training data): remove it from one of the files"
                )


def prepare_data(
    sizes: dict, seed: int, max_operand: int, out_dir: str | Path, files: dict | None = None, root: str | Path = "."
) -> dict:
    """Write ``{split}.jsonl`` for the four ``SPLITS`` and ``splits.json``; return the latter.

    ``files`` maps a split to a GSM8K-format JSONL (a path relative to ``root``, or absolute) read whole as that
    split; ``sizes[split]`` must then be its number of examples. The other splits are generated. ``splits.json``
    holds per split ``{"n", "sha256", "tasks", "source"}``, the source being ``{"file": the path as given,
    "sha256": of the file's bytes}`` or ``{"generated": {"seed", "max_operand"}}``."""
    missing, unknown = sorted(set(SPLITS) - set(sizes)), sorted(set(sizes) - set(SPLITS))
    if missing:
        raise ValueError(f"sizes lack splits {missing}; give sizes for all of {SPLITS}")
    if unknown:
        raise ValueError(f"sizes name unknown splits {unknown}; give sizes for exactly {SPLITS}")
    splits, sources = _read_files(files or {}, Path(root))
    for split, examples in splits.items():
        if sizes[split] != len(examples):
            raise ValueError(
                f"sizes.{split} is {sizes[split]!r} but files.{split} ({sources[split]['file']}) holds "
                f"{len(examples)} examples; a split read from a file is taken whole: set sizes.{split}: "
                f"{len(examples)}, or cut the file to the size you want"
            )
    generated = [split for split in SPLITS if split not in splits]
    if generated:
        splits |= make_splits({split: sizes[split] for split in generated}, seed, max_operand=max_operand)
        sources |= dict.fromkeys(generated, {"generated": {"seed": seed, "max_operand": max_operand}})
    splits = {split: splits[split] for split in SPLITS}
    _refuse_shared_questions(splits, sources)
    out = Path(out_dir)
    for name, examples in splits.items():
        save_jsonl(examples, out / f"{name}.jsonl")
    summary = {
        name: {"n": len(ex), "sha256": split_sha256(ex), "tasks": sorted({e.task for e in ex}), "source": sources[name]}
        for name, ex in splits.items()
    }
    write_json(out / "splits.json", summary)
    return summary


def load_splits(data_dir: str | Path) -> dict:
    return {name: load_jsonl(Path(data_dir) / f"{name}.jsonl") for name in SPLITS}
