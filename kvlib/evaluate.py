"""Evaluation: batched greedy decoding from the prompt, exact match of the final answer.

Prompts are left-padded so that a batch generates in lock-step (``generate`` derives positions from
the attention mask); decoding is greedy and stops at ``<eos>`` or ``max_new_tokens``. The final answer
is the integer after the first ``#### `` in the generated text (``kvlib.data.parse_answer``); an
example is correct when it equals the gold answer exactly. One JSON record per example is written:
id, task, gold, prediction (``null`` when no answer was produced), correct, and the generated text.

Nothing is truncated: an example whose prompt plus ``max_new_tokens`` needs more positions than the model's
``max_position_embeddings`` is refused before any decoding, naming its id and token count
(``kvlib.text.check_lengths``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kvlib.checkpoints import load_trained
from kvlib.data import Example, load_splits, parse_answer
from kvlib.files import write_text
from kvlib.progress import progress as progress_bar
from kvlib.text import check_lengths, encode_batch


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64, lengths: bool = False):
    """Greedy continuations of ``prompts`` (the new text only, special tokens removed); with ``lengths`` also the
    number of tokens each generated, its ``<eos>`` included (= its forward passes, the prompt's giving the first)."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must be >= 1")
    model.eval()
    device = next(model.parameters()).device
    texts, counts = [], []
    for i in range(0, len(prompts), batch_size):
        enc = encode_batch(tokenizer, prompts[i : i + batch_size], add_eos=False, padding_side="left")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out[:, ids.shape[1] :]  # (B, <= max_new_tokens), padded after <eos> with pad_token_id
        texts += tokenizer.batch_decode(new, skip_special_tokens=True)
        ended = (new == tokenizer.eos_token_id).cumsum(1) > 0  # (B, n): at or after the first <eos>
        counts += (new.shape[1] - ended.sum(1) + ended.any(1).long()).tolist()
    return (texts, counts) if lengths else texts


def _answers(model, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of the examples' prompts, refusing prompts that do not fit the model's positions."""
    prompts = [e.prompt for e in examples]
    limit = model.config.max_position_embeddings
    check_lengths(tokenizer, prompts, [e.id for e in examples], limit, reserve=max_new_tokens, add_eos=False)
    return generate(model, tokenizer, prompts, max_new_tokens, batch_size)


def accuracy(model, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int = 64) -> float:
    """Exact-match accuracy of greedy decoding on ``examples`` (no files written)."""
    if not examples:
        raise ValueError("accuracy needs at least one example")
    generated = _answers(model, tokenizer, examples, max_new_tokens, batch_size)
    return sum(parse_answer(text) == e.answer for e, text in zip(examples, generated)) / len(examples)


def evaluate(
    model, tokenizer, examples: list[Example], out_path: str | Path, max_new_tokens: int, batch_size: int = 64
) -> dict:
    """Accuracy of ``model`` on ``examples``; writes one JSON line per example to ``out_path`` (atomically)."""
    if not examples:
        raise ValueError("evaluate needs at least one example")
    prompts = [e.prompt for e in examples]
    limit = model.config.max_position_embeddings
    check_lengths(tokenizer, prompts, [e.id for e in examples], limit, reserve=max_new_tokens, add_eos=False)
    generated = []
    for i in progress_bar(range(0, len(prompts), batch_size), desc="evaluate", unit="batch"):  # generate()'s batches
        generated += generate(model, tokenizer, prompts[i : i + batch_size], max_new_tokens, batch_size)
    records = []
    for e, text in zip(examples, generated):
        prediction = parse_answer(text)
        records.append(
            {
                "id": e.id,
                "task": e.task,
                "gold": e.answer,
                "prediction": prediction,
                "correct": prediction == e.answer,
                "generated": text,
            }
        )
    write_text(out_path, "".join(json.dumps(r) + "\n" for r in records))
    by_task = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r["correct"])
    return {
        "n": len(records),
        "accuracy": sum(r["correct"] for r in records) / len(records),
        "answered": sum(r["prediction"] is not None for r in records) / len(records),
        "accuracy_by_task": {t: sum(c) / len(c) for t, c in sorted(by_task.items())},
    }


def validation(model, tokenizer, examples: list, max_new_tokens: int):
    """The training loop's validation callback: greedy exact-match accuracy on ``examples`` (none: no callback)."""
    if not examples:
        return None
    return lambda: {"accuracy": accuracy(model, tokenizer, examples, max_new_tokens)}


def evaluate_student(student_dir: str | Path, data_dir: str | Path, max_new_tokens: int, out_path) -> dict:
    """Greedy decoding of a trained student on the test split; one record per example written to ``out_path``."""
    model, tokenizer = load_trained(student_dir, inference=True)
    return evaluate(model, tokenizer, load_splits(data_dir)["test"], out_path, max_new_tokens)
