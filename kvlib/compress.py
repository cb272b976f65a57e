"""Compression of a KV cache to a budget of ``M`` slots per (example, KV head): importance + redundancy eviction.

KaVa (Kuzina et al., https://arxiv.org/abs/2510.02312) distils a teacher's chain-of-thought KV cache
compressed with an importance + redundancy rule that it describes after R-KV
(https://arxiv.org/abs/2505.24133): every eligible key position gets the score
``S = lam * I + (1 - lam) * R`` (``lam = 0.1``), and the top ``M`` are kept. This module implements that
rule **as KaVa's paper writes it** (``kava_scores``), which is *not* R-KV as its authors' code computes it
(Zefan-Cai/R-KV, ``rkv/utils.py`` and ``rkv/compression/r1_kv.py``). The differences, so that nobody
compares this rule with published R-KV numbers as if it were R-KV:

==============================  ======================================  =========================================
                                here (KaVa's description)               R-KV's code
==============================  ======================================  =========================================
observers                       the answer tokens (any query mask)      the last ``window_size`` (8) queries
attention normalised over       all keys the model attends to           only the keys before the window
                                (the model's own softmax)               (softmax over the sliced logits)
observer rows combined by       sum, then normalised over eligible      mean over the window
GQA query groups pooled         max over the group's probabilities      max over the group's logits, before
                                                                        the softmax
smoothing along time            none                                    max-pool with kernel 7
redundancy                      softmax of minus each key's mean        mean cosine similarity over the rows
                                cosine similarity to the other          after zeroing each key's most recent
                                eligible keys; ``+ (1 - lam) R``         near-duplicate (> 0.5), softmaxed, and
                                                                        *subtracted*: ``- (1 - lam) R``
lam                             0.1 (KaVa)                              0.07 (mix_lambda default)
recent tokens                   not protected                           the window is always kept
selection                       per (example, KV head); the store       per layer and head, during decoding
                                averages the scores over layers, so
                                one selection serves every layer
                                (``teacher_kv.kava_select``)
==============================  ======================================  =========================================

The parts:

- ``importance`` ``I``: the attention mass that the observer queries (e.g. the answer tokens) put on
  each key. The mass is summed over the observer queries of each query head (only their rows of the
  attention are read, ``O(Q T)`` per head for ``Q`` observers), then the ``Hq / H``
  query heads that share a KV head (GQA: query head ``j`` reads KV head ``j // (Hq / H)``) are
  max-pooled, and the result is normalised to sum to 1 over the eligible keys (all zeros when the
  observers put no mass on them, e.g. an example without observers).
- ``redundancy`` ``R``: softmax over the eligible keys of the *negated* mean cosine similarity of a
  key to the other eligible keys: a key that looks like the rest is redundant and scores low. The
  mean comes from the sum of the eligible unit keys, in ``O(T D)`` per head rather than ``O(T^2 D)``.
- ``select_slots`` keeps the top-``M`` eligible positions and returns them in time order, with a
  ``kept`` flag for the padding of examples that have fewer than ``M`` eligible keys;
  ``crop_slots`` keeps the ``M`` most recent eligible keys instead (the simple baseline);
  ``gather_slots`` reads the kept slots out of a ``(B, H, T, D)`` tensor.

Everything is vectorised over examples, heads and tokens; scores are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_mask(mask: Tensor, B: int, T: int, name: str) -> Tensor:
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"{name} must be (B, T) = ({B}, {T}), got shape {tuple(mask.shape)}")
    return mask.bool()


def importance(attn: Tensor, query_mask: Tensor, key_mask: Tensor, num_kv_heads: int) -> Tensor:
    """``(B, H, T)`` attention mass the observer queries put on each eligible key, summing to 1 over them.

    attn: (B, Hq, T, T) softmaxed attention weights, rows = queries, columns = keys (Hugging Face
    ``output_attentions=True`` under ``attn_implementation="eager"``); query_mask: (B, T) True on the
    observer queries; key_mask: (B, T) True on the eligible keys; num_kv_heads: the model's
    ``num_key_value_heads``, onto which the query heads are max-pooled.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(
            f"attn must be (B, Hq, T, T) attention weights (queries x keys), got shape {tuple(attn.shape)}; "
            "run the model with output_attentions=True under attn_implementation='eager'"
        )
    B, Hq, T, _ = attn.shape
    if num_kv_heads < 1 or Hq % num_kv_heads != 0:
        raise ValueError(
            f"attn has {Hq} query heads, which do not split evenly over num_kv_heads={num_kv_heads}; "
            "pass the model's num_key_value_heads"
        )
    observer = _check_mask(query_mask, B, T, "query_mask")
    eligible = _check_mask(key_mask, B, T, "key_mask")
    # only the observer rows are read: (B, Q, Hq, T), Q = the most observers of any example
    counts = observer.sum(1)  # (B,)
    Q = max(int(counts.max()), 1)
    rows = observer.float().argsort(dim=1, descending=True, stable=True)[:, :Q]  # (B, Q): observers first
    real = torch.arange(Q, device=attn.device)[None] < counts[:, None]  # (B, Q)
    rows = torch.where(real, rows, rows[:, :1])  # spare slots repeat the first observer: no padded query's row
    picked = attn.transpose(1, 2)[torch.arange(B, device=attn.device)[:, None], rows].float()  # (B, Q, Hq, T)
    mass = torch.einsum("bq,bqht->bht", real.float(), picked)  # (B, Hq, T)
    mass = mass.masked_fill((counts == 0)[:, None, None], 0)  # no observers: no mass, whatever row 0 holds
    mass = mass.view(B, num_kv_heads, Hq // num_kv_heads, T).amax(2)  # (B, H, T)
    mass = mass.masked_fill(~eligible[:, None], 0)
    return mass / mass.sum(-1, keepdim=True).clamp(min=1e-12)


def redundancy(keys: Tensor, key_mask: Tensor) -> Tensor:
    """``(B, H, T)`` softmax over eligible keys of minus each key's mean cosine similarity to the others.

    keys: (B, H, T, D); key_mask: (B, T) True on the eligible keys. Ineligible keys score 0 and do not
    enter the other keys' means; a lone eligible key scores 1. A key's summed similarity to the
    eligible keys is its dot product with their summed unit vectors, so no (T, T) matrix is formed.
    """
    if keys.dim() != 4:
        raise ValueError(f"keys must be (B, H, T, D), got shape {tuple(keys.shape)}")
    B, H, T, _ = keys.shape
    eligible = _check_mask(key_mask, B, T, "key_mask")
    norm = keys.float().norm(dim=-1)  # (B, H, T)
    unit = keys.float() / norm.clamp(min=1e-12)[..., None]  # (B, H, T, D), as F.normalize
    self_sim = (norm / norm.clamp(min=1e-12)) ** 2  # (B, H, T): 1, or 0 for an all-zero key
    mine = eligible[:, None, :].float()  # (B, 1, T)
    total = torch.einsum("bt,bhtd->bhd", eligible.float(), unit)  # the eligible unit keys summed
    summed = torch.einsum("bhtd,bhd->bht", unit, total) - mine * self_sim  # (B, H, T): similarity to the others
    mean_sim = summed / (eligible.sum(-1)[:, None, None] - mine).clamp(min=1)
    logits = (-mean_sim).masked_fill(~eligible[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).masked_fill(~eligible[:, None], 0)  # examples with no eligible key: 0


def kava_scores(attn: Tensor, keys: Tensor, query_mask: Tensor, key_mask: Tensor, lam: float = 0.1) -> Tensor:
    """KaVa's score ``lam * importance + (1 - lam) * redundancy``, (B, H, T), for keys (B, H, T, D)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam weighs importance against redundancy and must lie in [0, 1], got {lam}")
    i = importance(attn, query_mask, key_mask, keys.shape[1])
    return lam * i + (1 - lam) * redundancy(keys, key_mask)


def select_slots(scores: Tensor, key_mask: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """The ``budget`` best-scoring eligible positions of each (example, head), in increasing time order.

    scores: (B, H, T); key_mask: (B, T) True on the eligible keys. Returns ``(positions, kept)``, both
    (B, H, M) with ``M = budget``: positions (long) index the time axis, kept (bool) is False on the
    padding of examples with fewer than M eligible keys, which sits after the kept slots at position 0.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be (B, H, T), got shape {tuple(scores.shape)}")
    B, H, T = scores.shape
    eligible = _check_mask(key_mask, B, T, "key_mask")[:, None].expand(B, H, T)  # (B, H, T)
    if budget < 1:
        raise ValueError(f"budget is the number of slots kept per head and must be >= 1, got {budget}")
    if not torch.isfinite(scores[eligible]).all():
        raise ValueError("scores hold NaN or inf at eligible positions; compute them from finite attention and keys")
    k = min(budget, T)
    idx = scores.masked_fill(~eligible, float("-inf")).topk(k, dim=-1).indices  # (B, H, k)
    kept = eligible.gather(-1, idx)  # (B, H, k): False where an example ran out of eligible keys
    order = torch.where(kept, idx, T).sort(dim=-1).values  # (B, H, k): kept positions first, in time order
    kept = order < T
    positions = order.masked_fill(~kept, 0)
    pad = budget - k
    return F.pad(positions, (0, pad)), F.pad(kept, (0, pad))  # (B, H, M)


def crop_slots(key_mask: Tensor, budget: int, num_heads: int) -> tuple[Tensor, Tensor]:
    """The ``budget`` most recent eligible positions, the same for each of ``num_heads`` heads.

    key_mask: (B, T). Returns ``(positions, kept)`` (B, num_heads, M) as :func:`select_slots` does.
    """
    if key_mask.dim() != 2 or num_heads < 1:
        raise ValueError(
            f"crop_slots needs key_mask (B, T) and num_heads >= 1, got shape {tuple(key_mask.shape)} "
            f"and num_heads={num_heads}"
        )
    B, T = key_mask.shape
    recency = torch.arange(T, dtype=torch.float32, device=key_mask.device).expand(B, num_heads, T)  # (B, H, T)
    return select_slots(recency, key_mask, budget)


def gather_slots(x: Tensor, positions: Tensor) -> Tensor:
    """Read slots: x (B, H, T, D), positions (B, H, M) -> (B, H, M, D)."""
    if x.dim() != 4 or positions.dim() != 3 or x.shape[:2] != positions.shape[:2]:
        raise ValueError(
            f"gather_slots needs x (B, H, T, D) and positions (B, H, M) with the same B and H, got "
            f"{tuple(x.shape)} and {tuple(positions.shape)}"
        )
    if positions.numel() and (positions.min() < 0 or positions.max() >= x.shape[2]):
        raise ValueError(
            f"positions must lie in [0, {x.shape[2]}), got [{int(positions.min())}, {int(positions.max())}]; "
            "select them on this tensor's time axis"
        )
    return x.gather(2, positions[..., None].expand(*positions.shape, x.shape[-1]))  # (B, H, M, D)
