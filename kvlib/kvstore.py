"""The teacher KV store: teacher caches computed once over the student's training set, read by training.

A store is a directory of safetensors shards plus ``manifest.json``:

- ``shard-00000.safetensors``, ...: up to ``shard_size`` consecutive examples each. Examples are
  concatenated along time, so no padding is stored. Tensors of a shard holding ``n`` examples with
  ``N`` tokens and ``Ns`` stored KV slots in all:
  ``lengths`` (n,) the teacher tokens of each example; ``slots`` (n,) its stored KV slots (equal to
  ``lengths`` unless compressed); ``offsets`` (N, 2) character offsets of each token;
  ``segment_bounds`` (n, S + 1) token cut points of the segments (prompt / reasoning / answer);
  ``k.{l}`` and ``v.{l}`` (H, Ns, D) for each layer ``l``, in half precision by default; and for a
  compressed store ``positions`` (H, Ns) the teacher token each slot came from and ``kept`` (H, Ns),
  False on a slot a head did not keep.
- ``manifest.json``: the format, the ``KVSpec``, the dtype, whether the store is compressed, the
  caller's free-form ``meta`` (teacher, tokenizer, compression settings), the example count and ids,
  and per shard its example range ``[start, stop)``, size in bytes and SHA-256.

Choices: shards and manifest are written atomically (temp file in the same folder, then
``os.replace``) and the manifest last, after the old one is removed, so a half-written store is never
read as a finished one. Batches must be right-padded. A value that does not fit the storage dtype
raises instead of becoming inf (use ``bfloat16`` for teachers with huge activations). Reading checks
each shard's size and SHA-256 the first time it is opened and keeps opened shards in memory (read
into owned memory, not memory-mapped, so rewriting the store cannot change what a reader holds).

Compression (KaVa, https://arxiv.org/abs/2510.02312; see :mod:`kvlib.compress`) stores only the kept
slots, and :meth:`KVStore.batch` scatters them back onto the teacher's token axis with a mask, so a
compressed and a full store read the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from kvlib.files import atomic_write
from kvlib.hf import KVSpec

FORMAT = "kvlib-kvstore/1"
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
REQUIRED = {"ids", "kv", "attention_mask", "offsets", "segment_bounds"}
COMPRESSION = {"positions", "kept"}
PER_EXAMPLE = {"ids", "lengths", "slots", "segment_bounds"}  # cut by example; "offsets" by token; the rest by slot


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _chunk(batch: dict, index: int, spec: KVSpec, dtype: torch.dtype) -> dict:
    """Validate one batch and flatten it into a shard-layout chunk: padding dropped, time concatenated."""
    keys = set(batch)
    if not REQUIRED <= keys <= REQUIRED | COMPRESSION or len(keys & COMPRESSION) == 1:
        raise ValueError(
            f"batch {index} has keys {sorted(keys)}; expected {sorted(REQUIRED)} and, for compressed KV, "
            f"both {sorted(COMPRESSION)}"
        )
    mask = torch.as_tensor(batch["attention_mask"])
    if mask.dim() != 2:
        raise ValueError(f"batch {index}: attention_mask must be (B, T), got shape {tuple(mask.shape)}")
    B, T = mask.shape
    H, D = spec.num_kv_heads, spec.head_dim
    ids = batch["ids"]
    if not isinstance(ids, list | tuple) or len(ids) != B or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"batch {index}: ids must be a list of {B} strings (one per example), got {ids!r}")
    real = mask.bool()
    lengths = real.sum(1)  # (B,)
    right_padded = (real == (torch.arange(T) < lengths[:, None])).all(1) & (lengths > 0)
    if not right_padded.all():
        raise ValueError(
            f"batch {index}: examples {(~right_padded).nonzero().flatten().tolist()} are not right-padded with at "
            "least one real token; tokenize with padding_side='right'"
        )
    offsets = torch.as_tensor(batch["offsets"]).long()
    if tuple(offsets.shape) != (B, T, 2):
        raise ValueError(f"batch {index}: offsets must be (B, T, 2) = ({B}, {T}, 2), got {tuple(offsets.shape)}")
    bounds = torch.as_tensor(batch["segment_bounds"]).long()
    if bounds.dim() != 2 or bounds.shape[0] != B or bounds.shape[1] < 2:
        raise ValueError(f"batch {index}: segment_bounds must be (B, S + 1) with B={B}, got {tuple(bounds.shape)}")
    if (bounds[:, 0] != 0).any() or (bounds.diff(dim=1) < 0).any() or (bounds[:, -1] > lengths).any():
        raise ValueError(
            f"batch {index}: segment_bounds must run from 0, never decrease and end within each example's "
            f"tokens {lengths.tolist()}, got {bounds.tolist()}"
        )
    chunk = {"ids": list(ids), "lengths": lengths, "segment_bounds": bounds, "offsets": offsets[real]}  # (N, 2)
    M = T
    if "positions" in batch:
        positions, kept = torch.as_tensor(batch["positions"]).long(), torch.as_tensor(batch["kept"]).bool()
        if positions.dim() != 3 or tuple(positions.shape[:2]) != (B, H) or kept.shape != positions.shape:
            raise ValueError(
                f"batch {index}: positions and kept must both be (B, H, M) with (B, H) = ({B}, {H}), got "
                f"{tuple(positions.shape)} and {tuple(kept.shape)}"
            )
        outside = (positions < 0) | (positions >= lengths[:, None, None])  # (B, H, M)
        if (
            (kept[..., 1:] & ~kept[..., :-1]).any()
            or (kept[..., 1:] & (positions.diff(dim=-1) <= 0)).any()
            or (kept & outside).any()
        ):
            raise ValueError(
                f"batch {index}: kept slots must come first in each (example, head), at strictly increasing "
                f"positions inside the example's tokens {lengths.tolist()}, as compress.select_slots returns them"
            )
        M = positions.shape[2]
        slots = kept.sum(-1).amax(-1)  # (B,): the most slots any head of the example kept
        stored = torch.arange(M) < slots[:, None]  # (B, M)
        chunk |= {"positions": positions.transpose(0, 1)[:, stored], "kept": kept.transpose(0, 1)[:, stored]}
    else:
        slots, stored = lengths, real
    chunk["slots"] = slots
    kv = batch["kv"]
    if len(kv) != spec.num_layers:
        raise ValueError(f"batch {index}: kv has {len(kv)} layers but the spec says {spec.num_layers}")
    for layer, pair in enumerate(kv):
        for name, x in zip("kv", pair):
            if tuple(x.shape) != (B, H, M, D):
                raise ValueError(
                    f"batch {index}: layer {layer} {name.upper()} has shape {tuple(x.shape)}, expected "
                    f"(B, H, {'M' if 'positions' in batch else 'T'}, D) = {(B, H, M, D)} from the spec and masks; "
                    "store KV of the model the spec was read from"
                )
            x = x.detach().cpu().transpose(0, 1)[:, stored]  # (H, Ns, D)
            cast = x.to(dtype)
            if not torch.isfinite(cast).all():
                raise ValueError(
                    f"batch {index}: layer {layer} {name.upper()} is not finite in {dtype} (largest |x| = "
                    f"{x.float().abs().max().item():.4g}); store it with dtype=torch.bfloat16 or torch.float32"
                )
            chunk[f"{name}.{layer}"] = cast
    return chunk


def _cat(chunks: list[dict]) -> dict:
    """Concatenate chunks along their example, token or slot axis."""
    out = {}
    for name in chunks[0]:
        parts = [c[name] for c in chunks]
        if name == "ids":
            out[name] = sum(parts, [])
        else:
            out[name] = torch.cat(parts, dim=0 if name in PER_EXAMPLE | {"offsets"} else 1)
    return out


def _split(chunk: dict, n: int) -> tuple[dict, dict]:
    """The first ``n`` examples of a chunk and the rest."""
    cut_token, cut_slot = int(chunk["lengths"][:n].sum()), int(chunk["slots"][:n].sum())
    head, tail = {}, {}
    for name, x in chunk.items():
        if name in PER_EXAMPLE:
            head[name], tail[name] = x[:n], x[n:]
        elif name == "offsets":
            head[name], tail[name] = x[:cut_token], x[cut_token:]
        else:
            head[name], tail[name] = x[:, :cut_slot], x[:, cut_slot:]
    return head, tail


def _write_shard(directory: Path, number: int, chunk: dict, start: int) -> dict:
    name = f"shard-{number:05d}.safetensors"
    path = directory / name
    tensors = {k: v.contiguous() for k, v in chunk.items() if k != "ids"}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    stop = start + len(chunk["ids"])
    return {"file": name, "start": start, "stop": stop, "bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_store(
    directory,
    kv_batches: Iterable[dict],
    spec: KVSpec,
    meta: dict,
    shard_size: int = 256,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write teacher KV batches as a store in ``directory``; returns its path.

    Each batch is a dict: ``ids`` list[str]; ``kv`` L pairs (K, V) of (B, H, T, D) in any float dtype;
    ``attention_mask`` (B, T), right-padded; ``offsets`` (B, T, 2) character offsets;
    ``segment_bounds`` (B, S + 1) token cut points. A compressed batch adds ``positions`` (B, H, M) long
    and ``kept`` (B, H, M) bool from :func:`kvlib.compress.select_slots` / ``crop_slots``, and its K, V
    are (B, H, M, D). ``meta`` is any JSON dict, kept in the manifest. Batches are consumed one at a
    time, so ``kv_batches`` can be a generator running the teacher.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size is the number of examples per shard and must be >= 1, got {shard_size}")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of torch.{', torch.'.join(DTYPES)}, got {dtype}")
    try:
        json.dumps(meta, allow_nan=False)
        meta_ok = isinstance(meta, dict)
    except (TypeError, ValueError):
        meta_ok = False
    if not meta_ok:
        raise ValueError(f"meta must be a dict that JSON can hold (strings, numbers, lists, dicts), got {meta!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    shards, ids, seen, pending, layout = [], [], set(), [], None
    for index, batch in enumerate(kv_batches):
        chunk = _chunk(batch, index, spec, dtype)
        this = {"compressed": "positions" in chunk, "segments": chunk["segment_bounds"].shape[1] - 1}
        layout = layout or this
        if this != layout:
            raise ValueError(f"batch {index} has {this} but the batches before it {layout}; give every batch the same")
        counts = Counter(chunk["ids"])
        repeated = sorted(i for i in counts if i in seen or counts[i] > 1)
        if repeated:
            raise ValueError(f"batch {index}: example ids {repeated} appear more than once; ids must be unique")
        ids += chunk["ids"]
        seen.update(chunk["ids"])
        pending.append(chunk)
        while sum(len(c["ids"]) for c in pending) >= shard_size:
            full, rest = _split(_cat(pending), shard_size)
            shards.append(_write_shard(directory, len(shards), full, start=shards[-1]["stop"] if shards else 0))
            pending = [rest]
    if not ids:
        raise ValueError("kv_batches yielded no examples; a store needs at least one")
    rest = _cat(pending)
    if rest["ids"]:
        shards.append(_write_shard(directory, len(shards), rest, start=shards[-1]["stop"] if shards else 0))
    manifest = {
        "format": FORMAT,
        "spec": asdict(spec),
        "dtype": str(dtype).removeprefix("torch."),
        "compressed": layout["compressed"],
        "meta": meta,
        "num_examples": len(ids),
        "ids": ids,
        "shards": shards,
    }
    atomic_write(directory / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
    names = {s["file"] for s in shards}
    for stale in directory.glob("shard-*.safetensors"):  # left by an earlier, longer store in this directory
        if stale.name not in names:
            stale.unlink()
    return directory


class KVStore:
    """A store written by :func:`write_store`; :meth:`batch` reads examples back, padded, as float32."""

    def __init__(self, directory):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise ValueError(f"no {MANIFEST} in {self.directory}: not a finished KV store; run the teacher_kv stage")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); re-run the teacher_kv stage") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a kvlib KV store manifest ({FORMAT!r}); re-run the teacher_kv stage")
        self.spec = KVSpec(**manifest["spec"])
        self.meta: dict = manifest["meta"]
        self.ids: list[str] = manifest["ids"]
        self.compressed: bool = manifest["compressed"]
        self.dtype = DTYPES[manifest["dtype"]]
        self._shards: list[dict] = manifest["shards"]
        self._starts = torch.tensor([s["start"] for s in self._shards])
        self._cache: dict[int, dict[str, Tensor]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def footprint(self) -> dict:
        """Size on disk: ``examples``, teacher ``tokens``, shard ``bytes``, ``bytes_per_token``, the bytes per token
        of the same cache dense in float32 (``L x 2 x H x D x 4``) and the ratio of the two."""
        tokens = sum(int(self._shard(s)["lengths"].sum()) for s in range(len(self._shards)))
        stored = sum(entry["bytes"] for entry in self._shards)
        dense = self.spec.num_layers * 2 * self.spec.num_kv_heads * self.spec.head_dim * 4
        per_token = stored / max(tokens, 1)
        return {
            "examples": len(self),
            "tokens": tokens,
            "bytes": stored,
            "bytes_per_token": per_token,
            "dense_fp32_bytes_per_token": dense,
            "ratio_to_dense_fp32": per_token / dense,
        }

    def _shard(self, number: int) -> dict[str, Tensor]:
        """Shard ``number``'s tensors, verified against the manifest the first time and then cached."""
        if number not in self._cache:
            entry = self._shards[number]
            path = self.directory / entry["file"]
            if not path.is_file():
                raise ValueError(f"shard {path} is missing; re-run the teacher_kv stage")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise ValueError(
                    f"shard {path} holds {size} bytes but the manifest records {entry['bytes']}: it is truncated or "
                    "was overwritten; re-run the teacher_kv stage"
                )
            digest = _sha256(path)
            if digest != entry["sha256"]:
                raise ValueError(
                    f"shard {path} fails its checksum: expected sha256 {entry['sha256']}, got {digest}; the file is "
                    "corrupted, re-run the teacher_kv stage"
                )
            t = load_file(path, backend="pread")  # owned memory: an mmap would change under a rewritten store
            t["token_start"] = t["lengths"].cumsum(0) - t["lengths"]  # (n,) first token of each example
            t["slot_start"] = t["slots"].cumsum(0) - t["slots"]  # (n,) first stored slot of each example
            self._cache[number] = t
        return self._cache[number]

    def batch(self, indices: Sequence[int]) -> dict:
        """Examples ``indices``, right-padded to the longest of them.

        Returns ``kv``: L pairs (K, V) float32 (B, H, T, D) on the teacher's token axis, zero where
        ``mask`` is False; ``mask`` (B, H, T) bool, True on real tokens (compressed store: on kept
        slots only); ``attention_mask`` (B, T) long; ``offsets`` (B, T, 2) long; ``segment_bounds``
        (B, S + 1) long.
        """
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if idx.numel() == 0 or (idx < 0).any() or (idx >= len(self)).any():
            raise ValueError(f"indices must be a non-empty list of example numbers in [0, {len(self)}), got {indices}")
        shard_of = torch.searchsorted(self._starts, idx, right=True) - 1  # (B,)
        local = idx - self._starts[shard_of]  # (B,) example number inside its shard
        groups = {s: (shard_of == s).nonzero().flatten() for s in shard_of.unique().tolist()}
        lengths = torch.zeros(len(idx), dtype=torch.long)
        for s, rows in groups.items():
            lengths[rows] = self._shard(s)["lengths"][local[rows]]
        B, H, T, D = len(idx), self.spec.num_kv_heads, int(lengths.max()), self.spec.head_dim
        time = torch.arange(T)
        attention_mask = (time < lengths[:, None]).long()  # (B, T)
        kv = [tuple(torch.zeros(B, H, T, D) for _ in "kv") for _ in range(self.spec.num_layers)]
        mask = torch.zeros(B, H, T, dtype=torch.bool)
        offsets = torch.zeros(B, T, 2, dtype=torch.long)
        bounds = None
        for s, rows in groups.items():  # one vectorised gather per shard the batch touches
            t, loc = self._shard(s), local[rows]
            real = attention_mask[rows].bool()  # (b, T)
            token = (t["token_start"][loc, None] + time).clamp(max=t["offsets"].shape[0] - 1)  # (b, T)
            offsets[rows] = t["offsets"][token].masked_fill(~real[..., None], 0)  # (b, T, 2)
            if bounds is None:
                bounds = torch.zeros(B, t["segment_bounds"].shape[1], dtype=torch.long)
            bounds[rows] = t["segment_bounds"][loc]
            if self.compressed:
                slots = t["slots"][loc]
                M = int(slots.max())
                last = max(t["kept"].shape[1] - 1, 0)
                slot = (t["slot_start"][loc, None] + torch.arange(M)).clamp(max=last)  # (b, M)
                kept = t["kept"][:, slot].transpose(0, 1) & (torch.arange(M) < slots[:, None])[:, None]  # (b, H, M)
                dest = torch.where(kept, t["positions"][:, slot].transpose(0, 1), T)  # (b, H, M); T is a spill column
                mask[rows] = torch.zeros(len(rows), H, T + 1, dtype=torch.bool).scatter(2, dest, kept)[..., :T]
                for layer, pair in enumerate(kv):
                    for x, name in zip(pair, "kv"):
                        src = t[f"{name}.{layer}"][:, slot].transpose(0, 1).float()  # (b, H, M, D)
                        dense = torch.zeros(len(rows), H, T + 1, D).scatter(2, dest[..., None].expand_as(src), src)
                        x[rows] = dense[:, :, :T]  # (b, H, T, D)
            else:
                mask[rows] = real[:, None].expand(-1, H, -1)
                for layer, pair in enumerate(kv):
                    for x, name in zip(pair, "kv"):
                        src = t[f"{name}.{layer}"][:, token].transpose(0, 1).float()  # (b, H, T, D)
                        x[rows] = src.masked_fill(~real[:, None, :, None], 0)
        return {"kv": kv, "mask": mask, "attention_mask": attention_mask, "offsets": offsets, "segment_bounds": bounds}
