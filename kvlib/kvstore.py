"""The teacher KV store: teacher caches computed once over the student's training set, read by training.

A store is a directory of safetensors shards plus ``manifest.json``:

- ``shard-00000-<hash>.safetensors``, ...: up to ``shard_size`` consecutive examples each, named by their
  number and the first 16 hex digits of their SHA-256. Examples are concatenated along time, so no padding
  is stored. Tensors of a shard holding ``n`` examples with ``N`` tokens and ``Ns`` stored KV slots in all:
  ``lengths`` (n,) the teacher tokens of each example; ``slots`` (n,) its stored KV slots (equal to
  ``lengths`` unless compressed); ``offsets`` (N, 2) character offsets of each token;
  ``segment_bounds`` (n, S + 1) token cut points of the segments (prompt / reasoning / answer);
  ``k.{l}`` and ``v.{l}`` (H, Ns, D) for each layer ``l``, in half precision by default; and for a
  compressed store ``positions`` (H, Ns) the teacher token each slot came from and ``kept`` (H, Ns),
  False on a slot a head did not keep.
- ``manifest.json``: the format, the ``KVSpec``, the dtype, whether the store is compressed, the
  caller's free-form ``meta`` (teacher, tokenizer, compression settings, provenance hashes), the example
  count and ids, and per shard its file, example range ``[start, stop)``, size in bytes and SHA-256.

Choices:

- The manifest is the store's one commit point. A write (or rewrite) saves its shards beside the ones of
  the store already there, each to a temp file moved to its content name (an identical shard keeps its
  name and bytes), then replaces ``manifest.json`` with one ``os.replace``, and only then removes the
  shards the new manifest does not name. So at every instant the manifest in the folder names complete
  shards that are there: a rewrite that fails (a bad batch, a full disk) or is killed leaves the previous
  store readable as it was, and a first write leaves nothing that reads as a store. Whatever a killed
  write left (its shards, temp files) is removed by the next write; one writer per store at a time.
  Content names keep a re-run that computes the same KV byte-identical (DVC sees no change).
- Opening a store checks the manifest (required fields and their types, ids matching ``num_examples``,
  shard ranges contiguous over the ids). The first read of a shard checks its size and SHA-256, that its
  tensors are the ones the manifest describes (layers, KV heads, head dim, examples, tokens, slots, dtype)
  and that its K and V are finite; the shard is then kept in memory (read into owned memory, not
  memory-mapped, so rewriting the store cannot change what a reader holds, and truncating a file cannot
  crash it with SIGBUS). Every failure is a ``ValueError`` naming the file, the field or tensor, and the fix.
- Stores larger than memory: ``KVStore(directory, cache_bytes=...)`` keeps at most that many bytes of shards
  (their file sizes from the manifest), evicting the least recently used, and re-reads an evicted shard
  when a batch needs it again. A bound in bytes, not shards, because memory is what a user has to give and
  shards differ in size (example lengths, the last shard, compression). A re-read does not hash the file
  again: verification records the file's identity (device, inode, size, mtime in ns), and a re-read whose
  file still has it is trusted; a file replaced or edited since (new inode, size or mtime) is verified
  again, so a shard corrupted after it was evicted is refused. An in-place edit that keeps the size within
  the filesystem's timestamp tick of the verification goes unseen, as it does for make and rsync. Shards
  are read whole: under shuffled training a batch of B examples reads up to B shards, so write the store
  with a ``shard_size`` near the micro-batch when the cache is much smaller than the store.
- Batches must be right-padded. A value that does not fit the storage dtype raises instead of becoming
  inf (use ``bfloat16`` for teachers with huge activations).

Compression (KaVa, https://arxiv.org/abs/2510.02312; see :mod:`kvlib.compress`) stores only the kept
slots, and :meth:`KVStore.batch` scatters them back onto the teacher's token axis with a mask, so a
compressed and a full store read the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from kvlib.files import atomic_write, sync, temp_file
from kvlib.hf import KVSpec

FORMAT = "kvlib-kvstore/1"
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
REQUIRED = {"ids", "kv", "attention_mask", "offsets", "segment_bounds"}
COMPRESSION = {"positions", "kept"}
PER_EXAMPLE = {"ids", "lengths", "slots", "segment_bounds"}  # cut by example; "offsets" by token; the rest by slot
FIELDS = {
    "spec": dict,
    "dtype": str,
    "compressed": bool,
    "meta": dict,
    "num_examples": int,
    "ids": list,
    "shards": list,
}
SHARD_FIELDS = {"file": str, "start": int, "stop": int, "bytes": int, "sha256": str}
FIX = "re-run the teacher_kv stage"


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
    """Save one shard to a temp file, then move it to its content name; returns its manifest entry."""
    tensors = {k: v.contiguous() for k, v in chunk.items() if k != "ids"}
    tmp = temp_file(directory, "shard")
    mode = os.stat(tmp).st_mode  # a plain open()'s mode; safetensors recreates the file as 0o600
    save_file(tensors, tmp)
    os.chmod(tmp, stat.S_IMODE(mode))
    sync(tmp)
    digest, size = _sha256(Path(tmp)), os.path.getsize(tmp)
    name = f"shard-{number:05d}-{digest[:16]}.safetensors"
    os.replace(tmp, directory / name)
    return {"file": name, "start": start, "stop": start + len(chunk["ids"]), "bytes": size, "sha256": digest}


def _sweep(directory: Path) -> None:
    """Remove the shards the manifest in ``directory`` does not name (all of them when there is no readable
    manifest) and the temp files of interrupted writes; the store there, if any, stays complete."""
    try:
        keep = {entry["file"] for entry in KVStore(directory)._shards}
    except ValueError:  # no store there, or a damaged one: nothing to keep
        keep = set()
    leftovers = [*directory.glob("shard-*.safetensors"), *directory.glob(".shard.*.tmp")]
    for path in leftovers + list(directory.glob(f".{MANIFEST}.*.tmp")):
        if path.name not in keep:
            path.unlink()


def _write_shards(directory: Path, kv_batches: Iterable[dict], spec: KVSpec, dtype: torch.dtype, shard_size: int):
    """Validate and write the batches as shards in ``directory``: ``(shards, ids, compressed)``."""
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
    return shards, ids, layout["compressed"]


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
    time, so ``kv_batches`` can be a generator running the teacher. A store already in ``directory`` stays
    readable until the new one replaces it whole; if the write fails it stays, and the error propagates.
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
    _sweep(directory)  # what an earlier, killed write left
    try:
        shards, ids, compressed = _write_shards(directory, kv_batches, spec, dtype, shard_size)
        manifest = {
            "format": FORMAT,
            "spec": asdict(spec),
            "dtype": str(dtype).removeprefix("torch."),
            "compressed": compressed,
            "meta": meta,
            "num_examples": len(ids),
            "ids": ids,
            "shards": shards,
        }
        atomic_write(directory / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
    finally:
        _sweep(directory)  # written: the previous store's shards; failed: this write's
    return directory


def _damaged(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}; the store is damaged or was edited, {FIX}")


def _check_manifest(manifest: dict, path: Path) -> None:
    """Raise unless ``manifest`` holds every field with its type, as many ids as ``num_examples`` and shards
    whose ranges ``[start, stop)`` follow each other from 0 to ``num_examples``."""
    missing = sorted(set(FIELDS) - set(manifest))
    if missing:
        raise _damaged(path, f"the manifest lacks the fields {missing}")
    for field, kind in FIELDS.items():
        if type(manifest[field]) is not kind:
            raise _damaged(
                path, f"manifest field {field!r} must be of type {kind.__name__}, got {manifest[field]!r:.80}"
            )
    spec, names = manifest["spec"], [f.name for f in fields(KVSpec)]
    if sorted(spec) != sorted(names) or not all(type(v) is int and v >= 1 for v in spec.values()):
        raise _damaged(path, f"manifest field 'spec' must hold the positive integers {names}, got {spec}")
    if manifest["dtype"] not in DTYPES:
        raise _damaged(path, f"manifest field 'dtype' must be one of {list(DTYPES)}, got {manifest['dtype']!r}")
    n, ids = manifest["num_examples"], manifest["ids"]
    if n < 1 or len(ids) != n:
        raise _damaged(path, f"manifest field 'ids' holds {len(ids)} ids but 'num_examples' is {n} (at least 1)")
    if not all(type(i) is str for i in ids) or len(set(ids)) != n:
        raise _damaged(path, "manifest field 'ids' must hold unique strings")
    stop = 0
    for number, entry in enumerate(manifest["shards"]):
        if type(entry) is not dict or any(type(entry.get(f)) is not k for f, k in SHARD_FIELDS.items()):
            kinds = {f: k.__name__ for f, k in SHARD_FIELDS.items()}
            raise _damaged(path, f"manifest field 'shards' entry {number} must hold {kinds}, got {entry!r:.200}")
        if entry["start"] != stop or entry["stop"] <= stop:
            raise _damaged(
                path,
                f"manifest field 'shards' entry {number} holds examples [{entry['start']}, {entry['stop']}) but must "
                f"start at {stop}, where the one before it ends, and hold at least one",
            )
        stop = entry["stop"]
    if stop != n:
        raise _damaged(path, f"manifest field 'shards' covers examples [0, {stop}) but 'num_examples' is {n}")


class KVStore:
    """A store written by :func:`write_store`; :meth:`batch` reads examples back, padded, as float32."""

    def __init__(self, directory, cache_bytes: int | None = None):
        """Open the store in ``directory``; ``cache_bytes`` bounds the shards kept in memory (their file sizes),
        ``None`` keeps every shard read."""
        if cache_bytes is not None and (type(cache_bytes) is not int or cache_bytes < 1):
            raise ValueError(
                f"cache_bytes is the most bytes of shards kept in memory and must be a positive int or None "
                f"(no bound), got {cache_bytes!r}"
            )
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise ValueError(f"no {MANIFEST} in {self.directory}: not a finished KV store; {FIX}")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); {FIX}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a kvlib KV store manifest ({FORMAT!r}); {FIX}")
        _check_manifest(manifest, path)
        self.spec = KVSpec(**manifest["spec"])
        self.meta: dict = manifest["meta"]
        self.ids: list[str] = manifest["ids"]
        self.compressed: bool = manifest["compressed"]
        self.dtype = DTYPES[manifest["dtype"]]
        self._shards: list[dict] = manifest["shards"]
        self._starts = torch.tensor([s["start"] for s in self._shards])
        largest = max(self._shards, key=lambda entry: entry["bytes"])
        if cache_bytes is not None and cache_bytes < largest["bytes"]:
            raise ValueError(
                f"cache_bytes={cache_bytes} cannot hold the store's largest shard, {largest['file']} of "
                f"{largest['bytes']} bytes; give at least that, or write the store with a smaller shard_size"
            )
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, dict[str, Tensor]] = OrderedDict()  # least recently used first
        self._verified: dict[int, tuple[int, int, int, int]] = {}  # shard number -> (dev, inode, size, mtime_ns)

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

    def _check_shard(self, t: dict[str, Tensor], entry: dict, path: Path) -> None:
        """Raise unless the tensors ``t`` of shard ``entry`` are the ones the manifest describes (names, shapes for
        its examples, tokens and slots, dtype) and its K and V are finite."""
        L, H, D = self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim
        names = {"lengths", "slots", "offsets", "segment_bounds"} | (COMPRESSION if self.compressed else set())
        names |= {f"{x}.{layer}" for x in "kv" for layer in range(L)}
        edited = f"the manifest was edited or belongs to other shards, {FIX}"
        if set(t) != names:
            raise ValueError(
                f"shard {path} holds the tensors {sorted(set(t) - names)} the manifest does not describe and lacks "
                f"{sorted(names - set(t))} that it does (spec {self.spec}, compressed={self.compressed}); {edited}"
            )
        n = entry["stop"] - entry["start"]
        bounds = t["segment_bounds"]
        per_example = [tuple(t["lengths"].shape), tuple(t["slots"].shape), tuple(bounds.shape)]
        if per_example[:2] != [(n,), (n,)] or bounds.dim() != 2 or bounds.shape[0] != n or bounds.shape[1] < 2:
            raise ValueError(
                f"shard {path}: lengths, slots and segment_bounds have shapes {per_example} but the manifest gives the "
                f"shard the {n} examples [{entry['start']}, {entry['stop']}), so they must be ({n},), ({n},) and "
                f"({n}, S + 1); {edited}"
            )
        N, Ns = int(t["lengths"].sum()), int(t["slots"].sum())  # tokens, stored slots
        shapes = {"offsets": (N, 2)} | {f"{x}.{layer}": (H, Ns, D) for x in "kv" for layer in range(L)}
        shapes |= {name: (H, Ns) for name in COMPRESSION & names}
        for name, shape in shapes.items():
            if tuple(t[name].shape) != shape:
                raise ValueError(
                    f"shard {path}: {name} has shape {tuple(t[name].shape)} but {shape} follows from the manifest's "
                    f"spec {self.spec} and the shard's {N} tokens ({Ns} slots); {edited}"
                )
        if not self.compressed and not torch.equal(t["slots"], t["lengths"]):
            raise ValueError(f"shard {path}: slots differ from lengths in an uncompressed store; {edited}")
        for layer in range(L):
            for x in "kv":
                kv = t[f"{x}.{layer}"]
                if kv.dtype != self.dtype:
                    raise ValueError(
                        f"shard {path}: {x}.{layer} is {kv.dtype} but the manifest says {self.dtype}; {edited}"
                    )
                bad = int((~torch.isfinite(kv)).sum())
                if bad:
                    raise ValueError(
                        f"shard {path}: layer {layer} {x.upper()} holds {bad} non-finite values (NaN or Inf) under an "
                        f"intact checksum, so the teacher produced them over examples [{entry['start']}, "
                        f"{entry['stop']}); check that the teacher gives finite KV there and {FIX}"
                    )

    def _shard(self, number: int) -> dict[str, Tensor]:
        """Shard ``number``'s tensors, from the cache or read from disk; verified against the manifest the first
        time, and again only if its file changed since."""
        if number in self._cache:
            self._cache.move_to_end(number)
            return self._cache[number]
        entry = self._shards[number]
        path = self.directory / entry["file"]
        if not path.is_file():
            raise ValueError(f"shard {path} is missing; {FIX}")
        st = path.stat()
        if st.st_size != entry["bytes"]:
            raise ValueError(
                f"shard {path} holds {st.st_size} bytes but the manifest records {entry['bytes']}: it is truncated or "
                f"was overwritten; {FIX}"
            )
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        verify = self._verified.get(number) != identity
        if verify:
            digest = _sha256(path)
            if digest != entry["sha256"]:
                raise ValueError(
                    f"shard {path} fails its checksum: expected sha256 {entry['sha256']}, got {digest}; the file is "
                    f"corrupted, {FIX}"
                )
        t = load_file(path, backend="pread")  # owned memory: an mmap would change under a rewritten store
        if verify:
            self._check_shard(t, entry, path)
            self._verified[number] = identity
        t["token_start"] = t["lengths"].cumsum(0) - t["lengths"]  # (n,) first token of each example
        t["slot_start"] = t["slots"].cumsum(0) - t["slots"]  # (n,) first stored slot of each example
        self._cache[number] = t
        while self.cache_bytes is not None and self._cached_bytes() > self.cache_bytes:
            self._cache.popitem(last=False)  # never the shard just read: it fits alone
        return t

    def _cached_bytes(self) -> int:
        """The file bytes of the shards in the cache."""
        return sum(self._shards[number]["bytes"] for number in self._cache)

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
        shards = {s: self._shard(s) for s in groups}  # held while the batch is built, even if the cache evicts them
        lengths = torch.zeros(len(idx), dtype=torch.long)
        for s, rows in groups.items():
            lengths[rows] = shards[s]["lengths"][local[rows]]
        B, H, T, D = len(idx), self.spec.num_kv_heads, int(lengths.max()), self.spec.head_dim
        time = torch.arange(T)
        attention_mask = (time < lengths[:, None]).long()  # (B, T)
        kv = [tuple(torch.zeros(B, H, T, D) for _ in "kv") for _ in range(self.spec.num_layers)]
        mask = torch.zeros(B, H, T, dtype=torch.bool)
        offsets = torch.zeros(B, T, 2, dtype=torch.long)
        bounds = None
        for s, rows in groups.items():  # one vectorised gather per shard the batch touches
            t, loc = shards[s], local[rows]
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
