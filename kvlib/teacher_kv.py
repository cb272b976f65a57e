"""Teacher KV extraction: run a teacher once over the student's training set and write a KV store.

The teacher runs on whatever device it sits on (a GPU for real checkpoints); what is stored is moved
to the CPU. Each example is tokenised with the *teacher's* tokenizer (its own offsets and segment bounds go into
the store, so training can align any student to it), the teacher runs without gradients, and its
cache is written by ``kvlib.kvstore.write_store`` in half precision. With ``pre_rope`` the keys are
un-rotated with the teacher's own RoPE settings first (the default: keys of models with different
RoPE are only comparable before rotation).

Optional compression keeps ``budget`` slots per (example, KV head) among the prompt and reasoning
tokens; the answer tokens are the observers whose attention decides importance. ``kava_layer_mean``
scores each layer with KaVa's importance + redundancy rule (``S = lam * I + (1 - lam) * R``,
``kvlib.compress.kava_scores``; not R-KV as its authors' code computes it, see there) and averages the
scores over layers, so that one selection per (example, KV head) serves every layer (KaVa selects per
layer and head); ``crop`` keeps the most recent ones.

The store's ``meta`` records what it was extracted from, so that training can refuse a store of other
examples (positional ids like ``chain-00064`` repeat across splits and data seeds): ``examples_sha256``
(``kvlib.data.split_sha256`` of the examples, the bytes of their JSONL split), ``tokenizer_sha256`` (of the
fast tokenizer's ``tokenizer.json`` serialisation) and ``teacher_sha256`` (of the teacher's state dict as it
ran: each tensor's name, dtype, shape and bytes, in name order; one pass over the weights, cheap next to
running the teacher, and the same for a checkpoint and a model built in memory).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from kvlib.checkpoints import load_trained
from kvlib.compress import crop_slots, gather_slots, kava_scores, select_slots
from kvlib.data import SEGMENTS, Example, load_splits, split_sha256
from kvlib.hf import extract_kv, extract_kv_and_attention, kv_spec
from kvlib.kvstore import KVStore, write_store
from kvlib.progress import progress as progress_bar
from kvlib.rope import unrotate_keys
from kvlib.text import check_lengths, encode_batch

COMPRESSIONS = ("kava_layer_mean", "crop")


def segment_masks(bounds: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) masks of the answer tokens (observers) and of the real prompt + reasoning tokens (eligible),
    from segment bounds (B, S + 1) and the attention mask (B, T)."""
    t = torch.arange(attention_mask.shape[1])[None]  # (1, T)
    answer_start, end = bounds[:, -2:-1], bounds[:, -1:]
    return (t >= answer_start) & (t < end), (t < answer_start) & attention_mask.bool()


def kava_select(
    attn: list[Tensor], keys: list[Tensor], observers: Tensor, eligible: Tensor, budget: int, lam: float = 0.1
) -> tuple[Tensor, Tensor]:
    """One selection per (example, KV head) for all layers: each layer's scores (attn L x (B, Hq, T, T),
    keys L x (B, H, T, D)) averaged over layers, then the top ``budget`` eligible slots (``select_slots``)."""
    scores = torch.stack([kava_scores(a, k, observers, eligible, lam) for a, k in zip(attn, keys)])  # (L, B, H, T)
    return select_slots(scores.mean(0), eligible, budget)  # (B, H, M) positions and kept


def tokenizer_sha256(tokenizer) -> str:
    """sha256 (hex) of a fast tokenizer's ``tokenizer.json`` serialisation: vocabulary, merges, specials."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def weights_sha256(model) -> str:
    """sha256 (hex) of ``model``'s state dict: each tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, x in sorted(model.state_dict().items()):
        x = x.detach().cpu().contiguous()
        digest.update(f"{name} {x.dtype} {tuple(x.shape)}\n".encode())
        digest.update(x.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@torch.no_grad()
def run_teacher(
    model, tokenizer, examples: list[Example], pre_rope: bool = True, attention: bool = False
) -> tuple[dict, list[tuple[Tensor, Tensor]], list[Tensor] | None]:
    """The teacher over ``examples``, tokenised by its own tokenizer: ``(encoded, kv, attn)``.

    encoded: ``kvlib.text.encode_batch`` (on the CPU); kv: L pairs of (B, H, T, D) on the model's device,
    keys un-rotated with ``pre_rope``; attn: with ``attention`` the L (B, Hq, T, T) attention weights, else None.
    """
    device = next(model.parameters()).device
    spans = [{name: e.spans[name] for name in SEGMENTS} for e in examples]
    enc = encode_batch(tokenizer, [e.text for e in examples], spans)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    if attention:
        kv, attn = extract_kv_and_attention(model, ids, mask)
    else:
        kv, attn = extract_kv(model, ids, mask), None
    if pre_rope:
        positions = torch.arange(ids.shape[1], device=device)
        kv = [(unrotate_keys(k, positions, model.config), v) for k, v in kv]
    return enc, kv, attn


def online_batch(model, tokenizer, examples: list[Example], pre_rope: bool = True) -> dict:
    """What ``KVStore.batch`` returns for ``examples``, computed by running the teacher now instead of reading
    a store (uncompressed; KV in the model's dtype, on its device; the rest on the CPU)."""
    enc, kv, _ = run_teacher(model, tokenizer, examples, pre_rope)
    real = enc["attention_mask"].bool().to(kv[0][0].device)  # (B, T)
    kv = [(k.masked_fill(~real[:, None, :, None], 0), v.masked_fill(~real[:, None, :, None], 0)) for k, v in kv]
    mask = real[:, None].expand(-1, kv[0][0].shape[1], -1)  # (B, H, T)
    return {"kv": kv, "mask": mask} | {k: enc[k] for k in ("attention_mask", "offsets", "segment_bounds")}


@torch.no_grad()
def extract_store(
    model,
    tokenizer,
    examples: list[Example],
    directory: str | Path,
    batch_size: int = 32,
    pre_rope: bool = True,
    budget: int | None = None,
    compression: str = "kava_layer_mean",
    lam: float = 0.1,
    meta: dict | None = None,
    progress: bool = True,
) -> KVStore:
    """Write the KV store of ``model`` over ``examples`` to ``directory`` and open it. Its meta holds ``meta``,
    the extraction settings and the SHA-256 of the examples, the tokenizer and the teacher's weights; a store
    already in ``directory`` stays readable until the new one is complete (``kvlib.kvstore.write_store``)."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if budget is not None and budget < 1:
        raise ValueError(f"budget must be >= 1 slot per head, or None for no compression; got {budget}")
    model.eval()
    check_lengths(tokenizer, [e.text for e in examples], [e.id for e in examples], model.config.max_position_embeddings)
    spec = kv_spec(model.config)

    def batches():
        for i in progress_bar(range(0, len(examples), batch_size), desc="teacher KV", disable=not progress):
            chunk = examples[i : i + batch_size]
            attention = budget is not None and compression == "kava_layer_mean"
            enc, kv, attn = run_teacher(model, tokenizer, chunk, pre_rope, attention)
            kv = [(k.float().cpu(), v.float().cpu()) for k, v in kv]  # the store converts to its dtype
            attn = None if attn is None else [a.float().cpu() for a in attn]
            mask = enc["attention_mask"]
            batch = {"ids": [e.id for e in chunk], "kv": kv, "attention_mask": mask}
            batch |= {"offsets": enc["offsets"], "segment_bounds": enc["segment_bounds"]}
            if budget is not None:
                observers, eligible = segment_masks(enc["segment_bounds"], mask)
                if attn is None:
                    positions, kept = crop_slots(eligible, budget, spec.num_kv_heads)
                else:
                    positions, kept = kava_select(attn, [k for k, _ in kv], observers, eligible, budget, lam)
                batch["kv"] = [(gather_slots(k, positions), gather_slots(v, positions)) for k, v in kv]
                batch |= {"positions": positions, "kept": kept}
            yield batch

    settings = {"pre_rope": pre_rope, "budget": budget, "compression": compression if budget else None, "lam": lam}
    settings |= {
        "examples_sha256": split_sha256(examples),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "teacher_sha256": weights_sha256(model),
    }
    write_store(directory, batches(), spec, {**(meta or {}), **settings})
    return KVStore(directory)


def extract_teacher_kv(
    teacher_dir: str | Path, data_dir: str | Path, out_dir: str | Path, budget: int | None = None, **options
) -> KVStore:
    """The teacher's KV over the student-training split (pre-RoPE keys, fp16), optionally compressed."""
    model, tokenizer = load_trained(teacher_dir, inference=True)
    examples = load_splits(data_dir)["student_train"]
    meta = {"teacher": str(teacher_dir), "model_type": model.config.model_type}
    return extract_store(model, tokenizer, examples, out_dir, budget=budget, meta=meta, **options)
