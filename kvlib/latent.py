"""The latent-reasoning student: continuous thoughts instead of a written chain of thought (CODI, KaVa).

The student reads the question, then a begin-of-thought marker, and produces ``M`` continuous thoughts: the
last hidden state of each step, mapped back to an input embedding by a small trainable projection
(``ThoughtProjection``: Linear -> GELU -> Linear -> LayerNorm, the projection of CODI, Shen et al. 2025,
https://arxiv.org/abs/2502.21074, which KaVa, Kuzina et al. 2025, https://arxiv.org/abs/2510.02312,
builds on), is the next step's input embedding; an end-of-thought marker follows, then the answer is
decoded. The two markers are trainable embedding vectors rather than new tokens, so any family's
vocabulary and embedding matrix stay as they are. Two ways to compute the thoughts (``passes``):

- ``0``: **sequential**, one forward pass per thought on the cache of everything before it;
- ``P > 0``: **parallel (Jacobi) refinement** as KaVa does it (3 passes there): all M thoughts in one forward
  pass, ``P`` times, thought ``i`` of pass ``p`` being the projection of the hidden state at position ``i - 1``
  of pass ``p - 1`` (position -1: the begin marker); the first pass starts from M copies of the begin marker's
  projection. Pass ``p`` gets thoughts ``1..p`` exactly as the sequential loop does, so ``P >= M`` passes
  reproduce it (a test checks this).

Prompts are left-padded so that every example's thoughts sit at the same positions; ``position_ids`` count
real tokens only, as generation from left-padded prompts does. The cache of the prompt and the thoughts
carries gradients, so the answer's CE reaches the projection through every thought.
``LatentStudent.forward`` returns the answer CE, the hidden states before the answer (one per layer, for
CODI's term) and the student's K and V at the thought positions (``(B, H, M, D)`` per layer, for the KV term
against the teacher's chain of thought compressed to M slots); ``generate`` decodes greedily and counts the
forward passes each answer took.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kvlib.compress import crop_slots, gather_slots, kava_scores, select_slots
from kvlib.data import SEGMENTS, TASKS, parse_answer
from kvlib.distill import LayerProjection
from kvlib.files import write_json
from kvlib.hf import decoder_config, eager_attention, extract_kv_and_attention, kv_spec
from kvlib.losses import kv_distance
from kvlib.models import load_model
from kvlib.rope import unrotate_keys
from kvlib.text import encode_batch


def latent_batch(tokenizer, examples: list, index: list[int] | None = None) -> dict:
    """A latent student's batch: the prompts left-padded (``prompt_ids``, ``prompt_mask``: ``<bos>`` + the
    question, no ``<eos>``), the answers ``#### n`` + ``<eos>`` right-padded (``answer_ids``, ``answer_mask``),
    and the whole text with its written chain of thought for teacher mode, right-padded (``input_ids``,
    ``attention_mask``, ``segment_bounds`` (B, 4): the token cuts of prompt / reasoning / answer), ``task_ids``,
    and with ``index`` the examples' numbers in the training set (``index`` (B,): the rows of the teachers' slot
    tables, ``kvlib.slot_table``)."""
    text = encode_batch(tokenizer, [e.text for e in examples], [e.spans for e in examples])
    enc = encode_batch(tokenizer, [e.prompt for e in examples], add_eos=False, padding_side="left")
    answers = tokenizer([f"#### {e.answer}" for e in examples], add_special_tokens=False)["input_ids"]
    rows = [torch.tensor([*a, tokenizer.eos_token_id]) for a in answers]
    answer_ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id)  # (B, Ta)
    lengths = torch.tensor([len(r) for r in rows])
    answer_mask = (torch.arange(answer_ids.shape[1]) < lengths[:, None]).long()  # (B, Ta)
    batch = {
        "prompt_ids": enc["input_ids"],
        "prompt_mask": enc["attention_mask"],
        "answer_ids": answer_ids,
        "answer_mask": answer_mask,
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "segment_bounds": text["segment_bounds"],
        "task_ids": torch.tensor([TASKS.index(e.task) for e in examples]),
    }
    if index is not None:
        if len(index) != len(examples):
            raise ValueError(f"index names {len(index)} examples but the batch has {len(examples)}")
        batch["index"] = torch.tensor(index)
    return batch


class ThoughtProjection(nn.Module):
    """(..., h) last hidden state -> (..., h) input embedding: Linear -> GELU -> Linear -> LayerNorm."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
            nn.LayerNorm(hidden_size),
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


@dataclass
class Thoughts:
    """What ``LatentStudent.think`` leaves: the cache after the thoughts, the mask and next position, the M
    thoughts' input embeddings and the hidden states that produced them (``inputs[:, i] = project(hidden[:, i])``;
    hidden[:, 0] is the begin marker's), and the forward passes taken."""

    cache: object
    mask: Tensor  # (B, Tp + 1 + M) long: real prompt tokens, the begin marker and the thoughts
    next_position: Tensor  # (B, 1) long: the position of the end marker
    inputs: Tensor  # (B, M, h)
    hidden: Tensor  # (B, M, h)
    passes: int


class LatentStudent(nn.Module):
    """A causal LM that reasons in ``num_thoughts`` continuous thoughts (see the module docstring)."""

    def __init__(self, model, num_thoughts: int, passes: int = 0):
        super().__init__()
        if num_thoughts < 1 or passes < 0:
            raise ValueError(f"num_thoughts={num_thoughts} must be >= 1 and passes={passes} >= 0 (0: sequential)")
        kv_spec(model.config)  # refuses a model without an attention KV cache
        h = decoder_config(model.config).hidden_size
        self.student, self.num_thoughts, self.passes = model, num_thoughts, passes
        self.project = ThoughtProjection(h)
        scale = model.get_input_embeddings().weight.detach().std().item()
        self.bot = nn.Parameter(torch.randn(h) * scale)  # begin-of-thought marker, (h,)
        self.eot = nn.Parameter(torch.randn(h) * scale)  # end-of-thought marker, (h,)
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def _step(self, embeds: Tensor, mask: Tensor, positions: Tensor, cache=None):
        """One forward pass of ``embeds`` (B, t, h) at ``positions`` (B, t) after ``cache``; mask (B, cached + t).
        Only the last position's logits are computed (B, 1, V): thoughts need none, decoding the last."""
        return self.student(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
        )

    def read_prompt(self, prompt_ids: Tensor, prompt_mask: Tensor):
        """One forward pass over left-padded prompts (B, Tp) without the begin marker: the model's output (its
        cache, logits and hidden states, with gradients), which ``think`` and ``teacher_mode`` both continue, so
        that a training step reads each prompt once."""
        _check_prompts(prompt_ids, prompt_mask)
        positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)  # (B, Tp): real tokens counted from 0
        return self._step(self.student.get_input_embeddings()(prompt_ids), prompt_mask, positions)

    def think(self, prompt_ids: Tensor, prompt_mask: Tensor, prompt=None) -> Thoughts:
        """Read left-padded prompts (B, Tp) and the begin marker, then produce the M thoughts. ``prompt``: the
        prompts' pass already made (``read_prompt``), continued here by the begin marker (one pass more)."""
        _check_prompts(prompt_ids, prompt_mask)
        B, M = prompt_ids.shape[0], self.num_thoughts
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, 1)], 1)  # (B, Tp + 1)
        last = prompt_mask.sum(1, keepdim=True)  # (B, 1): the begin marker's position
        if prompt is None:
            embeds = self.student.get_input_embeddings()(prompt_ids)  # (B, Tp, h)
            embeds = torch.cat([embeds, self.bot.to(embeds.dtype).expand(B, 1, -1)], 1)  # (B, Tp + 1, h)
            out = self._step(embeds, mask, (mask.cumsum(1) - 1).clamp(min=0))
        else:
            bot = self.bot.to(prompt.hidden_states[-1].dtype).expand(B, 1, -1)
            out = self._step(bot, mask, last, _copy_cache(prompt.cache))
        h0, cache, read = out.hidden_states[-1][:, -1], out.cache, 1 + (prompt is not None)  # (B, h)
        if self.passes == 0:
            hidden, inputs = [h0], []
            for i in range(M):  # each thought needs the one before it: inherently sequential, as decoding is
                inputs.append(self.project(hidden[-1]))  # (B, h)
                mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
                out = self._step(inputs[-1][:, None], mask, last + 1 + i, cache)
                cache = out.cache
                hidden.append(out.hidden_states[-1][:, -1])
            return Thoughts(cache, mask, last + 1 + M, torch.stack(inputs, 1), torch.stack(hidden[:-1], 1), M + read)
        prompt_cache, thought_mask = cache, torch.cat([mask, mask.new_ones(B, M)], 1)  # (B, Tp + 1 + M)
        thought_positions = last + 1 + torch.arange(M, device=last.device)  # (B, M)
        hidden = h0[:, None].expand(B, M, -1)  # (B, M, h): pass 0's guess, every thought from the begin marker
        for _ in range(self.passes):
            used, inputs = hidden, self.project(hidden)  # (B, M, h) each
            out = self._step(inputs, thought_mask, thought_positions, _copy_cache(prompt_cache))
            hidden = torch.cat([h0[:, None], out.hidden_states[-1][:, :-1]], 1)  # (B, M, h): shifted by one
        return Thoughts(out.cache, thought_mask, last + 1 + M, inputs, used, self.passes + read)

    def forward(self, batch: dict, prompt=None) -> dict[str, Tensor]:
        """Loss terms on a latent batch (``latent_batch``): ``ce`` of the answer tokens after the thoughts and the
        end marker, ``loss`` (= ce; the distillation terms are weighted by the caller), ``hidden`` the hidden
        states before the first answer token (L + 1 of (B, h): embeddings, then each layer) and ``kv`` the
        student's K and V at the thought positions (L pairs of (B, H, M, D), post-RoPE, at ``kv_positions``
        (B, M)). ``prompt``: the prompts' pass already made (``read_prompt``)."""
        t = self.think(batch["prompt_ids"], batch["prompt_mask"], prompt)
        answer_ids, answer_mask = batch["answer_ids"], batch["answer_mask"]  # (B, Ta) right-padded
        B, Ta = answer_ids.shape
        embeds = self.student.get_input_embeddings()(answer_ids)  # (B, Ta, h)
        embeds = torch.cat([self.eot.to(embeds.dtype).expand(B, 1, -1), embeds], 1)  # (B, 1 + Ta, h)
        mask = torch.cat([t.mask, t.mask.new_ones(B, 1), answer_mask], 1)
        positions = t.next_position + torch.arange(1 + Ta, device=answer_ids.device)  # (B, 1 + Ta)
        out = self.student(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=t.cache,
            use_cache=True,
            output_hidden_states=True,
        )
        logits = out.logits[:, :-1]  # (B, Ta, V): the end marker predicts answer token 0, and so on
        real = answer_mask.bool()
        ce = F.cross_entropy(logits[real].float(), answer_ids[real])
        thoughts = slice(t.mask.shape[1] - self.num_thoughts, t.mask.shape[1])  # their positions in the cache
        kv = [(layer.keys[:, :, thoughts], layer.values[:, :, thoughts]) for layer in out.cache.layers]
        positions = t.next_position - self.num_thoughts + torch.arange(self.num_thoughts, device=answer_ids.device)
        hidden = [h[:, 0] for h in out.hidden_states]
        return {"ce": ce, "loss": ce, "hidden": hidden, "kv": kv, "kv_positions": positions, "thought_hidden": t.hidden}

    def save_pretrained(self, directory, state_dict: dict | None = None) -> None:
        """Save the model as Hugging Face does (``directory``) and the projection, markers and settings beside it
        (``latent.safetensors``, ``latent.json``), so ``load_latent`` restores it; ``state_dict`` as
        ``kvlib.train`` passes it (this module's parameters, e.g. gathered from several processes)."""
        state = self.state_dict() if state_dict is None else state_dict
        model = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
        self.student.save_pretrained(directory, state_dict=model)
        own = {k: v.contiguous() for k, v in state.items() if not k.startswith("student.")}
        save_file(own, str(Path(directory) / "latent.safetensors"))
        write_json(Path(directory) / "latent.json", {"num_thoughts": self.num_thoughts, "passes": self.passes})

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int, eos_id: int):
        """Greedy answers after the thoughts: ``(tokens (B, <= max_new_tokens), forward_passes (B,))``; an answer
        stops at ``eos_id`` (kept in ``tokens``, then padded with it). Passes per answer: the prompt, the
        thoughts (M sequential, or P Jacobi passes), the end marker and one per generated token but the last."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        t = self.think(prompt_ids, prompt_mask)
        B = prompt_ids.shape[0]
        mask = torch.cat([t.mask, t.mask.new_ones(B, 1)], 1)
        out = self._step(self.eot.to(t.inputs.dtype).expand(B, 1, -1), mask, t.next_position, t.cache)
        passes = torch.full((B,), t.passes + 1, device=prompt_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
        tokens = []
        for i in range(max_new_tokens):  # greedy decoding: one token per step
            token = out.logits[:, -1].argmax(-1).masked_fill(done, eos_id)  # (B,)
            tokens.append(token)
            done |= token == eos_id
            if done.all() or i == max_new_tokens - 1:
                break
            passes += ~done
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            embeds = self.student.get_input_embeddings()(token[:, None])  # (B, 1, h)
            out = self._step(embeds, mask, t.next_position + 1 + i, out.cache)
        return torch.stack(tokens, 1), passes


@torch.no_grad()
def evaluate_latent(latent: LatentStudent, tokenizer, examples: list, max_new_tokens: int, batch_size: int = 64):
    """Greedy answers of a latent student: ``(records, summary)``, one record per example (``id``, ``task``,
    ``gold``, ``prediction``, ``correct``, ``generated``, ``forward_passes``) and the accuracy with the mean
    forward passes per answer (what KaVa compares with chain-of-thought decoding)."""
    if not examples:
        raise ValueError("evaluate_latent needs at least one example")
    latent.eval()
    device = next(latent.parameters()).device
    texts, counts = [], []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        enc = encode_batch(tokenizer, [e.prompt for e in chunk], add_eos=False, padding_side="left")  # prompts only
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        tokens, passes = latent.generate(ids, mask, max_new_tokens, tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(tokens, skip_special_tokens=True)
        counts += passes.tolist()
    return scored(examples, texts, counts)


def scored(examples: list, texts: list[str], passes: list[int]) -> tuple[list, dict]:
    """The records of answers ``texts`` to ``examples`` that took ``passes`` forward passes each (``id``, ``task``,
    ``gold``, ``prediction``, ``correct``, ``generated``, ``forward_passes``), and their accuracy with the mean
    forward passes per answer; the latent study scores every mode's answers so."""
    records = []
    for e, text, n in zip(examples, texts, passes, strict=True):
        prediction = parse_answer(text)
        records.append(
            {"id": e.id, "task": e.task, "gold": e.answer, "prediction": prediction}
            | {"correct": prediction == e.answer, "generated": text, "forward_passes": n}
        )
    summary = {
        "n": len(records),
        "accuracy": sum(r["correct"] for r in records) / len(records),
        "forward_passes": sum(r["forward_passes"] for r in records) / len(records),
    }
    return records, summary


def load_latent(directory) -> LatentStudent:
    """A ``LatentStudent`` saved by its ``save_pretrained`` (a training run's ``model/``)."""
    directory = Path(directory)
    if not (directory / "latent.json").is_file():
        raise ValueError(f"{directory} holds no latent.json: it is not a latent student's model folder")
    settings = json.loads((directory / "latent.json").read_text())
    latent = LatentStudent(load_model(directory), settings["num_thoughts"], settings["passes"])
    missing, unexpected = latent.load_state_dict(load_file(str(directory / "latent.safetensors")), strict=False)
    if unexpected or any(not k.startswith("student.") for k in missing):
        raise ValueError(f"{directory}/latent.safetensors does not fit: missing {missing}, unexpected {unexpected}")
    return latent


def _check_prompts(prompt_ids: Tensor, prompt_mask: Tensor) -> None:
    if prompt_mask.shape != prompt_ids.shape or (prompt_mask[:, -1] == 0).any():
        raise ValueError(
            f"prompts must be left-padded (B, Tp) ids with a mask of the same shape whose last column is real, "
            f"got ids {tuple(prompt_ids.shape)} and mask {tuple(prompt_mask.shape)}; encode them with "
            "kvlib.text.encode_batch(..., add_eos=False, padding_side='left')"
        )


def _copy_cache(cache):
    """A copy of a ``DynamicCache`` that can be extended without changing ``cache``: its layers' ``update``
    concatenates into new tensors, so copying the layer objects is enough (each Jacobi pass starts from the
    prompt's cache)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    return new


def cot_slots(model, batch: dict, budget: int, rule: str = "rkv", lam: float = 0.1, shared: bool = False) -> dict:
    """A teacher's KV over the written chain of thought, compressed to ``budget`` slots per (layer, KV head).

    ``model`` reads the whole text of a ``latent_batch`` (no gradient: these are targets). ``rkv``: each layer's
    slots by KaVa's importance + redundancy score (``kvlib.compress.kava_scores``: importance from the answer
    tokens' attention, redundancy from key similarity, ``lam``); ``crop``: the last ``budget`` reasoning tokens.
    Slots stay in time order; keys are returned before RoPE (``kvlib.rope``), so that they compare with a
    student's thoughts at other positions. Returns ``{"kv": L pairs of (B, H, M, D), "kept": (L, B, H, M) bool,
    "positions": (L, B, H, M)}`` (the token each slot holds):
    a chain shorter than ``budget`` tokens fills only its first slots. ``shared``: one selection for every layer
    and head (the scores averaged over them), so that slot j is one teacher token everywhere, as a teacher of
    another family needs (its layers and heads are mixed into the student's).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    ids, mask, bounds = batch["input_ids"], batch["attention_mask"], batch["segment_bounds"]
    if bounds.shape[1] != len(SEGMENTS) + 1:
        raise ValueError(f"segment_bounds must cut {SEGMENTS} ((B, 4)), got shape {tuple(bounds.shape)}")
    with torch.no_grad():
        kv, attn = extract_kv_and_attention(model, ids, mask)
    return select_cot_slots(kv, attn, bounds, budget, model.config, rule, lam, shared)


def select_cot_slots(
    kv, attn, bounds: Tensor, budget: int, config, rule="rkv", lam=0.1, shared=False, start: Tensor | None = None
) -> dict:
    """``cot_slots`` from a pass already made: the cache ``kv`` (L pairs of (B, H, T, D), post-RoPE) and attention
    weights ``attn`` (L of (B, Hq, T, T)) of a model with ``config`` over the text cut by ``bounds`` (B, 4), its
    first token at position ``start`` (B,) (0 when not given: the whole text was read; ``teacher_mode``'s pass
    over the chain after a shared prompt starts later), which ``positions`` then count from."""
    kv = [(k.detach(), v.detach()) for k, v in kv]
    attn = None if attn is None else [a.detach() for a in attn]  # the crop rule reads none
    T = kv[0][0].shape[2]
    pos = torch.arange(T, device=bounds.device)
    cot = (pos >= bounds[:, 1:2]) & (pos < bounds[:, 2:3])  # (B, T): the reasoning tokens, the eligible keys
    answer = (pos >= bounds[:, 2:3]) & (pos < bounds[:, 3:4])  # (B, T): the observers
    positions = pos.expand(bounds.shape[0], T)  # (B, T): right padding, so positions are the indices
    if start is not None:
        positions = positions + start[:, None]
    H = kv[0][0].shape[1]
    if rule == "rkv":
        scores = torch.stack(
            [kava_scores(a.float(), k, answer, cot, lam) for (k, _), a in zip(kv, attn)]
        )  # (L, B, H, T)
        if shared:
            scores = scores.mean((0, 2), keepdim=True).expand_as(scores)  # (L, B, H, T): one score per token
        chosen = [select_slots(layer_scores, cot, budget) for layer_scores in scores]  # L of (B, H, M) pairs
    else:
        chosen = [crop_slots(cot, budget, H)] * len(kv)
    slots = []
    for (k, v), (where, _) in zip(kv, chosen):
        pre = unrotate_keys(k, positions, config)  # (B, H, T, D)
        slots.append((gather_slots(pre, where), gather_slots(v, where)))
    where, kept = (torch.stack(x) for x in zip(*chosen))  # (L, B, H, M) each
    if start is not None:
        where = where + start[None, :, None, None]
    return {"kv": slots, "kept": kept, "positions": where}


RULES = ("rkv", "crop")


def teacher_mode(model, batch: dict, cache: bool = False, prompt=None, attention: bool = True) -> dict:
    """The same network reading the written chain of thought: ``ce`` of every reasoning and answer token (the
    self-distilled teacher is trained too) and ``hidden`` (L + 1 of (B, h)) at the last token before the answer,
    the position whose hidden state CODI matches with the student's before-answer one. With ``cache`` the pass
    also returns its ``kv`` (L pairs of (B, H, T, D)) and, with ``attention`` (under eager attention), ``attn``
    (L of (B, Hq, T, T)) over the tokens it read, with their ``bounds`` (B, 4) and the position of the first one,
    ``start`` (B,), so that ``select_cot_slots`` takes the self-distillation targets from this one pass (the crop
    rule needs no attention).

    ``prompt``: the student's pass over the batch's left-padded prompts (``LatentStudent.read_prompt``). Where
    the text's prompt tokens are those prompts, the chain and the answer continue that pass (a causal model
    computes the same prompt states either way, so only the reading is shared); ``kv``, ``attn`` and ``bounds``
    then cover the chain and the answer. Otherwise (no ``prompt``, or a tokenizer that merges a token across the
    prompt's end) the whole text is read."""
    ids, mask, bounds = batch["input_ids"], batch["attention_mask"], batch["segment_bounds"]
    B, T = ids.shape
    shared = prompt is not None and _prompt_is_prefix(batch)
    if shared:  # the chain and the answer (B, Tc), right-padded, after the prompt's cache
        prompt_mask = batch["prompt_mask"]
        length = bounds[:, 3] - bounds[:, 1]  # (B,)
        span = torch.arange(int(length.max()), device=ids.device)  # (Tc,)
        real = span < length[:, None]  # (B, Tc)
        ids = ids.gather(1, (bounds[:, 1:2] + span).clamp(max=T - 1)).masked_fill(~real, 0)  # (B, Tc)
        zero = torch.zeros_like(length)
        start, bounds = bounds[:, 1], torch.stack([zero, zero, bounds[:, 2] - bounds[:, 1], length], 1)
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.cat([prompt_mask, real.long()], 1),
            "position_ids": start[:, None] + span,
            "cache": _copy_cache(prompt.cache),
        }
    else:
        start, inputs = torch.zeros_like(bounds[:, 0]), {"input_ids": ids, "attention_mask": mask}
    if cache and attention:
        with eager_attention(model):
            out = model(**inputs, use_cache=True, output_hidden_states=True, output_attentions=True)
    else:
        out = model(**inputs, use_cache=cache or shared, output_hidden_states=True)
    # logits[:, j] predicts token j + 1 of what was read; with the prompt shared, its last logits predict token 0
    logits, hidden = out.logits, list(out.hidden_states)
    if shared:
        logits = torch.cat([prompt.logits[:, -1:], logits], 1)  # (B, 1 + Tc, V)
        hidden = [torch.cat([p[:, -1:], h], 1) for p, h in zip(prompt.hidden_states, hidden)]  # (B, 1 + Tc, h)
    n = ids.shape[1]
    pos = torch.arange(1 - shared, n, device=ids.device)  # the positions of the predicted tokens
    target = (pos >= bounds[:, 1:2]) & (pos < bounds[:, 3:4])  # reasoning and answer tokens
    ce = F.cross_entropy(logits[:, : len(pos)][target].float(), ids[:, pos][target])
    before = (bounds[:, 2] - 1 + shared).clamp(min=0)  # (B,) the last reasoning token (or the prompt's last)
    hidden = [h[torch.arange(B), before] for h in hidden]
    if not cache:
        return {"ce": ce, "hidden": hidden}
    kv = [(layer.keys[:, :, -n:], layer.values[:, :, -n:]) for layer in out.cache.layers]
    attn = [a[..., -n:] for a in out.attentions] if attention else None
    return {"ce": ce, "hidden": hidden, "kv": kv, "attn": attn, "bounds": bounds, "start": start}


def _prompt_is_prefix(batch: dict) -> bool:
    """Whether each text's first ``segment_bounds[:, 1]`` tokens are its left-padded prompt's real tokens."""
    prompt_ids, prompt_mask, bounds = batch["prompt_ids"], batch["prompt_mask"], batch["segment_bounds"]
    if not torch.equal(prompt_mask.sum(1), bounds[:, 1]):
        return False
    Tp = prompt_ids.shape[1]
    at = (torch.arange(Tp, device=prompt_ids.device) - (Tp - bounds[:, 1:2])).clamp(min=0)  # (B, Tp)
    text = batch["input_ids"].gather(1, at.clamp(max=batch["input_ids"].shape[1] - 1))
    return bool(((text == prompt_ids) | (prompt_mask == 0)).all())


def codi_loss(student_hidden: list[Tensor], teacher_hidden: list[Tensor]) -> Tensor:
    """CODI's term: the L1 distance between the student's and the (detached) teacher's hidden states before the
    answer, each layer divided by the teacher's std there, averaged over layers; L + 1 of (B, h) each."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student hidden states but {len(teacher_hidden)} teacher ones")
    terms = []
    for s, t in zip(student_hidden, teacher_hidden):
        t = t.detach().float()
        terms.append((s.float() - t).abs().mean() / t.std().clamp(min=1e-6))
    return torch.stack(terms).mean()


def thought_kv_loss(student: dict, targets: dict, config, kind: str = "l1") -> Tensor:
    """The KV term: the student's thought K and V (``LatentStudent.forward``'s ``kv``, keys un-rotated at their
    ``kv_positions``) against the ``cot_slots`` targets, slot by slot in order, over the kept slots; each side
    standardised by its own statistics per layer (``kvlib.losses.kv_distance``), so no scale can collapse."""
    if len(student["kv"]) != len(targets["kv"]):
        raise ValueError(f"student has {len(student['kv'])} layers, the targets {len(targets['kv'])}; map layers first")
    per_layer = []
    for (k, v), (kt, vt), keep in zip(student["kv"], targets["kv"], targets["kept"]):
        k = unrotate_keys(k, student["kv_positions"], config)  # (B, H, M, D)
        per_layer.append(kv_distance(k, kt, keep, kind, True) + kv_distance(v, vt, keep, kind, True))
    return torch.stack(per_layer).mean()


class SlotAligner(LayerProjection):
    """A teacher's M chain-of-thought slots (``cot_slots(..., shared=True)``: Lt pairs of (B, Ht, M, Dt)) ->
    student-shaped targets (Ls pairs of (B, Hs, M, Ds)) by ``kvlib.distill.LayerProjection``: the layer map's mix
    of teacher layers, then one ``KVProjector`` per student layer (head mixing, head-dim map). The time axis needs
    no alignment: slot j supervises thought j, one to one and in order. Built as ``SlotAligner(spec_t, spec_s,
    layer_map, projector="linear")``."""

    def forward(self, slots: dict) -> tuple[list, Tensor]:
        """``(targets, kept)``: Ls pairs of (B, Hs, M, Ds) and the (B, M) slots that hold a teacher token."""
        targets, _ = self.project([(k.float(), v.float()) for k, v in slots["kv"]])
        kept = slots["kept"].all(0).all(1)  # (B, M): shared slots are kept (or not) in every layer and head
        return targets, kept


class LatentDistiller(nn.Module):
    """KaVa's training of a ``LatentStudent``: with its own teacher mode (self-distillation, as KaVa), or with
    teachers of other families, fused when there are several.

    ``forward(batch)`` (a ``latent_batch``) returns the terms ``kvlib.train.train`` logs and weighs: ``ce`` (the
    answer after the thoughts), ``teacher_ce`` (the student network in teacher mode on the chain of thought and
    the answer), ``codi`` (``codi_loss`` between the two modes) and ``kv`` (``thought_kv_loss``), and ``loss``,
    their sum with ``weights`` (name -> weight; CE has weight 1). The student mode and the teacher mode continue
    one pass over the prompts (``LatentStudent.read_prompt``). The KV targets are stop-gradient: without
    ``teachers`` the teacher mode's own ``cot_slots``; with them each teacher's shared ``cot_slots``, looked up in
    its ``kvlib.slot_table.SlotTable`` by the batch's example ``index``, through its ``SlotAligner`` (trained
    here) and, for several, a ``kvlib.fusion`` module over the M slots (the router reads the thoughts' last
    hidden states; the attention kind, which needs the student's queries, is refused).
    """

    def __init__(
        self,
        latent: LatentStudent,
        weights: dict[str, float],
        rule: str = "rkv",
        kind: str = "l1",
        teachers: tuple = (),
        aligners: tuple = (),
        fusion=None,
    ):
        super().__init__()
        unknown = sorted(set(weights) - {"teacher_ce", "codi", "kv"})
        if unknown or min(weights.values(), default=0) < 0:
            raise ValueError(f"weights are >= 0 for teacher_ce, codi and kv; got {weights}")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if len(teachers) != len(aligners) or (len(teachers) > 1) != (fusion is not None):
            raise ValueError(
                f"give one SlotAligner per teacher ({len(teachers)} teachers, {len(aligners)} aligners) and a fusion "
                "exactly when there are several teachers"
            )
        if fusion is not None and type(fusion).__name__ == "AttentionFusion":
            raise ValueError(
                "attention fusion needs the student's queries, which thoughts do not have; use another kind"
            )
        self.student, self.weights, self.rule, self.kind = latent, dict(weights), rule, kind
        self.teachers = list(teachers)  # slot tables: plain tensors, not trained and not saved with the student
        self.aligners, self.fusion = nn.ModuleList(aligners), fusion
        self._no_split_modules = latent._no_split_modules

    def targets(self, s: dict, batch: dict, teacher: dict) -> dict:
        """The KV targets of the student's thoughts ``s`` (``LatentStudent.forward``): L pairs and (L, B, H, M);
        ``teacher``: the teacher mode's pass (``teacher_mode(..., cache=True)`` for self-distillation)."""
        model, M = self.student.student, self.student.num_thoughts
        if not self.teachers:
            kv, attn, bounds, start = (teacher[k] for k in ("kv", "attn", "bounds", "start"))
            return select_cot_slots(kv, attn, bounds, M, model.config, self.rule, start=start)
        if "index" not in batch:
            raise ValueError("teachers' slot tables are read by example: the batch needs its examples' 'index' (B,)")
        aligned = [
            aligner(table(batch["index"])) for table, aligner in zip(self.teachers, self.aligners)
        ]  # per teacher: Ls pairs of (B, Hs, M, Ds) and (B, M)
        if self.fusion is None:
            targets, kept = aligned[0]
            kept = [kept] * len(targets)
        else:
            targets, kept = [], []
            for layer, (k_s, v_s) in enumerate(s["kv"]):
                k_s = unrotate_keys(k_s, s["kv_positions"], model.config)
                k, v, mask, _ = self.fusion(
                    [a[0][layer] for a in aligned],
                    [a[1] for a in aligned],
                    student_kv=(k_s.detach(), v_s.detach()),
                    student_h=s["thought_hidden"].detach(),
                    student_q=None,
                    task_ids=batch["task_ids"],
                    layer=layer,
                )
                targets.append((k, v))
                kept.append(mask)
        H = targets[0][0].shape[1]
        return {"kv": targets, "kept": torch.stack([m[:, None].expand(-1, H, -1) for m in kept])}  # (L, B, H, M)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        model = self.student.student
        prompt = self.student.read_prompt(batch["prompt_ids"], batch["prompt_mask"])
        s = self.student(batch, prompt)
        own = self.weights.get("kv", 0) > 0 and not self.teachers  # self-distillation: the slots of this pass
        teacher = teacher_mode(model, batch, cache=own, prompt=prompt, attention=self.rule == "rkv")
        terms = {"ce": s["ce"], "teacher_ce": teacher["ce"], "codi": codi_loss(s["hidden"], teacher["hidden"])}
        if self.weights.get("kv", 0) > 0:
            terms["kv"] = thought_kv_loss(s, self.targets(s, batch, teacher), model.config, self.kind)
        terms["loss"] = terms["ce"] + sum(w * terms[n] for n, w in self.weights.items() if n in terms)
        return terms

    def term_weights(self) -> dict[str, float]:
        return {"ce": 1.0} | self.weights
