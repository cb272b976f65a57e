import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kvlib import kvstore
from kvlib.compress import gather_slots, select_slots
from kvlib.hf import KVSpec, extract_kv, kv_spec
from kvlib.kvstore import KVStore, write_store
from kvlib.models import build_model, model_config

SIZES = [3, 2, 4]  # batch sizes: 9 examples; with shard_size=4 the second batch spans shards 0 and 1
META = {"teacher": "tiny-llama", "tokenizer": "chars", "compression": None}


def padded_batch(model, first: int, lengths: list[int], generator) -> dict:
    """A right-padded batch of random token ids of these lengths, with the teacher's KV over it."""
    B, T = len(lengths), max(lengths)
    n = torch.tensor(lengths)
    mask = (torch.arange(T) < n[:, None]).long()  # (B, T)
    ids = torch.randint(0, 50, (B, T), generator=generator) * mask
    with torch.no_grad():
        kv = extract_kv(model, ids, mask)
    char = torch.arange(T) * 2
    offsets = torch.stack([char, char + 2], dim=-1).expand(B, T, 2) * mask[..., None]  # (B, T, 2)
    bounds = torch.stack([torch.zeros_like(n), n // 3, 2 * n // 3, n], dim=1)  # (B, 4): three segments
    return {
        "ids": [f"ex{first + i}" for i in range(B)],
        "kv": kv,
        "attention_mask": mask,
        "offsets": offsets,
        "segment_bounds": bounds,
    }


@pytest.fixture(scope="module")
def teacher_batches():
    config = model_config("llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32, vocab_size=50)
    model = build_model(config, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    batches, first = [], 0
    for size in SIZES:
        lengths = torch.randint(3, 13, (size,), generator=g).tolist()
        batches.append(padded_batch(model, first, lengths, g))
        first += size
    return kv_spec(model.config), batches


@pytest.fixture(scope="module")
def store_dir(teacher_batches, tmp_path_factory):
    spec, batches = teacher_batches
    return write_store(tmp_path_factory.mktemp("store"), batches, spec, META, shard_size=4)


def examples(batches):
    """Per example number: (batch, row) in the written batches."""
    return [(b, r) for b in batches for r in range(len(b["ids"]))]


def test_round_trip_restores_teacher_kv_at_real_positions_within_fp16(teacher_batches, store_dir):
    spec, batches = teacher_batches
    store = KVStore(store_dir)
    indices = [2, 3, 4, 8, 0]  # touches all three shards, out of order
    out = store.batch(indices)
    rows = examples(batches)
    T = max(int(rows[i][0]["attention_mask"][rows[i][1]].sum()) for i in indices)
    assert out["attention_mask"].shape == (5, T) and out["mask"].shape == (5, spec.num_kv_heads, T)
    for i, n in enumerate(indices):
        batch, r = rows[n]
        length = int(batch["attention_mask"][r].sum())
        assert out["attention_mask"][i].tolist() == [1] * length + [0] * (T - length)
        assert out["mask"][i, :, :length].all() and not out["mask"][i, :, length:].any()
        assert torch.equal(out["offsets"][i, :length], batch["offsets"][r, :length])
        assert torch.equal(out["segment_bounds"][i], batch["segment_bounds"][r])
        for (k, v), (k0, v0) in zip(out["kv"], batch["kv"]):
            for x, x0 in ((k, k0), (v, v0)):
                assert x.dtype == torch.float32
                torch.testing.assert_close(x[i, :, :length], x0[r, :, :length], atol=1e-3, rtol=1e-3)
                assert torch.equal(x[i, :, :length], x0[r, :, :length].half().float())  # exactly the fp16 value
                assert (x[i, :, length:] == 0).all()


def test_padding_positions_are_not_stored(teacher_batches, store_dir):
    spec, batches = teacher_batches
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    stored = {"k.0": 0, "v.1": 0, "offsets": 0}
    for path in sorted(store_dir.glob("shard-*.safetensors")):
        with safe_open(path, "pt") as f:
            stored["k.0"] += f.get_slice("k.0").get_shape()[1]
            stored["v.1"] += f.get_slice("v.1").get_shape()[1]
            stored["offsets"] += f.get_slice("offsets").get_shape()[0]
    assert stored == {"k.0": tokens, "v.1": tokens, "offsets": tokens}
    assert tokens < sum(b["attention_mask"].numel() for b in batches)  # the batches did hold padding


def test_shards_hold_shard_size_examples_and_a_batch_can_span_two(teacher_batches, store_dir):
    _, batches = teacher_batches
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 4), (4, 8), (8, 9)]
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    for s in manifest["shards"]:
        with safe_open(store_dir / s["file"], "pt") as f:
            assert f.get_tensor("lengths").tolist() == lengths[s["start"] : s["stop"]]
    store = KVStore(store_dir)
    whole = store.batch(range(9))
    pieces = [store.batch([i]) for i in range(9)]
    for i, piece in enumerate(pieces):
        t = piece["attention_mask"].shape[1]
        assert torch.equal(whole["kv"][1][0][i, :, :t], piece["kv"][1][0][0])


def test_manifest_records_spec_dtype_meta_ids_and_shard_checksums(teacher_batches, store_dir):
    spec, _ = teacher_batches
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert manifest["spec"] == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8}
    assert manifest["dtype"] == "float16" and manifest["compressed"] is False
    assert manifest["meta"] == META
    assert manifest["num_examples"] == 9 and manifest["ids"] == [f"ex{i}" for i in range(9)]
    assert sorted(p.name for p in store_dir.iterdir()) == sorted(
        ["manifest.json"] + [s["file"] for s in manifest["shards"]]
    )
    for s in manifest["shards"]:
        data = (store_dir / s["file"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["bytes"] == len(data)
    store = KVStore(store_dir)
    assert store.spec == spec and store.meta == META and store.ids == manifest["ids"] and len(store) == 9
    assert store.compressed is False


def test_kv_is_stored_in_fp16_at_half_the_bytes_per_token_of_fp32(teacher_batches, store_dir, tmp_path):
    spec, batches = teacher_batches
    fp32_dir = write_store(tmp_path, batches, spec, META, shard_size=4, dtype=torch.float32)

    def kv_bytes_per_token(directory):
        total, tokens = 0, 0
        for path in directory.glob("shard-*.safetensors"):
            with safe_open(path, "pt") as f:
                tokens += int(f.get_tensor("lengths").sum())
                for name in f.keys():
                    if name[:2] in ("k.", "v."):
                        x = f.get_tensor(name)
                        assert x.dtype == (torch.float16 if directory == store_dir else torch.float32)
                        total += x.numel() * x.element_size()
        return total / tokens

    half, full = kv_bytes_per_token(store_dir), kv_bytes_per_token(fp32_dir)
    assert half == 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 2  # K and V, 2 bytes each
    assert half / full == 0.5
    assert torch.equal(
        KVStore(fp32_dir).batch([1])["kv"][0][0][0],
        batches[0]["kv"][0][0][1, :, : batches[0]["attention_mask"][1].sum()],
    )


def test_footprint_counts_real_tokens_and_shard_bytes(teacher_batches, store_dir):
    spec, batches = teacher_batches
    f = KVStore(store_dir).footprint()
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    shards = sum(p.stat().st_size for p in store_dir.glob("shard-*.safetensors"))
    assert (f["examples"], f["tokens"], f["bytes"]) == (sum(len(b["ids"]) for b in batches), tokens, shards)
    assert f["dense_fp32_bytes_per_token"] == spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4
    assert f["bytes_per_token"] == shards / tokens
    assert 0.5 < f["ratio_to_dense_fp32"] < 1  # fp16 KV plus offsets and per-example records


def test_compressed_store_scatters_kept_slots_back_to_their_positions(teacher_batches, tmp_path):
    spec, batches = teacher_batches
    g = torch.Generator().manual_seed(1)
    budget = 5  # some examples are shorter (3 tokens): they keep everything and pad
    compressed = []
    for b in batches:
        mask = b["attention_mask"]
        scores = torch.rand(mask.shape[0], spec.num_kv_heads, mask.shape[1], generator=g)  # (B, H, T)
        positions, kept = select_slots(scores, mask, budget)
        kv = [(gather_slots(k, positions), gather_slots(v, positions)) for k, v in b["kv"]]  # (B, H, M, D)
        compressed.append(b | {"kv": kv, "positions": positions, "kept": kept})
    assert any(not c["kept"].all() for c in compressed)  # an example shorter than the budget pads its slots
    write_store(tmp_path, compressed, spec, META | {"compression": {"kind": "random", "budget": budget}}, shard_size=4)
    store = KVStore(tmp_path)
    assert store.compressed and store.meta["compression"]["budget"] == budget
    out = store.batch(range(9))
    kept_slots = 0
    for n, ((b, r), (full, _)) in enumerate(zip(examples(compressed), examples(batches))):
        length = int(b["attention_mask"][r].sum())
        assert out["attention_mask"][n].sum() == length
        for h in range(spec.num_kv_heads):
            pos = b["positions"][r, h][b["kept"][r, h]]
            kept_slots += len(pos)
            expected_mask = torch.zeros(out["mask"].shape[-1], dtype=torch.bool)
            expected_mask[pos] = True
            assert torch.equal(out["mask"][n, h], expected_mask)
            assert len(pos) == min(budget, length)
            for (k, v), (k0, v0) in zip(out["kv"], full["kv"]):  # the teacher's own KV at the kept positions
                assert torch.equal(k[n, h, pos], k0[r, h, pos].half().float())
                assert torch.equal(v[n, h, pos], v0[r, h, pos].half().float())
                assert (k[n, h, ~expected_mask] == 0).all() and (v[n, h, ~expected_mask] == 0).all()
    stored = 0
    for path in tmp_path.glob("shard-*.safetensors"):
        with safe_open(path, "pt") as f:
            stored += f.get_slice("k.0").get_shape()[1]
    assert stored * spec.num_kv_heads == kept_slots  # every head kept as many slots here: no padding stored


def test_heads_that_keep_different_numbers_of_slots_round_trip(tmp_path):
    batch = synthetic_batch(0, [4, 3])
    positions = torch.tensor([[[0, 2, 3], [1, 0, 0]], [[0, 1, 0], [2, 0, 0]]])  # (B, H, M) = (2, 2, 3)
    kept = torch.tensor([[[1, 1, 1], [1, 0, 0]], [[1, 1, 0], [1, 0, 0]]]).bool()
    full = batch["kv"]
    batch |= {"positions": positions, "kept": kept, "kv": [tuple(gather_slots(x, positions) for x in p) for p in full]}
    write_store(tmp_path, [batch], SPEC, {})
    with safe_open(shard_path(tmp_path, 0), "pt") as f:
        assert f.get_tensor("slots").tolist() == [3, 2]  # the most any head of the example kept
    out = KVStore(tmp_path).batch([0, 1])
    T, F = True, False
    assert out["mask"].tolist() == [[[T, F, T, T], [F, T, F, F]], [[T, T, F, F], [F, F, T, F]]]
    for (k, v), (k0, v0) in zip(out["kv"], full):
        assert torch.equal(k, torch.where(out["mask"][..., None], k0.half().float(), 0))
        assert torch.equal(v, torch.where(out["mask"][..., None], v0.half().float(), 0))


# a small synthetic store for corruption and error tests

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4)


def shard_path(directory, number: int):
    """The file of shard ``number``, as the manifest names it."""
    return directory / json.loads((directory / "manifest.json").read_text())["shards"][number]["file"]


def synthetic_batch(first: int, lengths: list[int], spec: KVSpec = SPEC) -> dict:
    B, T = len(lengths), max(lengths)
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()
    return {
        "ids": [f"s{first + i}" for i in range(B)],
        "kv": [
            tuple(torch.randn(B, spec.num_kv_heads, T, spec.head_dim) for _ in "kv") for _ in range(spec.num_layers)
        ],
        "attention_mask": mask,
        "offsets": torch.zeros(B, T, 2, dtype=torch.long),
        "segment_bounds": torch.stack([torch.zeros(B, dtype=torch.long), mask.sum(1)], dim=1),
    }


@pytest.fixture
def small_store(tmp_path):
    return write_store(tmp_path, [synthetic_batch(0, [3, 5]), synthetic_batch(2, [4])], SPEC, {}, shard_size=2)


def test_opened_shards_are_verified_once_and_cached(small_store):
    store = KVStore(small_store)
    first = store.batch([0, 2])
    shard = shard_path(small_store, 0)
    shard.write_bytes(shard.read_bytes()[:100])  # damage it after it was opened
    assert torch.equal(store.batch([0, 2])["kv"][0][0], first["kv"][0][0])
    with pytest.raises(ValueError, match="truncated"):
        KVStore(small_store).batch([0])


def test_rewriting_a_store_removes_its_stale_shards(small_store):
    assert len(list(small_store.glob("shard-*"))) == 2
    write_store(small_store, [synthetic_batch(0, [2])], SPEC, {"run": 2}, shard_size=2)
    assert list(small_store.glob("shard-*")) == [shard_path(small_store, 0)]
    store = KVStore(small_store)
    assert len(store) == 1 and store.meta == {"run": 2}


def test_a_corrupted_shard_fails_its_checksum(small_store):
    shard = shard_path(small_store, 1)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # flip a byte of the tensor data: same size, different content
    shard.write_bytes(bytes(data))
    store = KVStore(small_store)
    store.batch([0, 1])  # shard 0 is intact
    with pytest.raises(
        ValueError, match=r"shard-00001-\w{16}.safetensors fails its checksum: expected sha256 \w+, got \w+;.*"
    ):
        store.batch([2])
    with pytest.raises(ValueError, match="re-run the teacher_kv stage"):
        store.batch([2])


def test_a_truncated_shard_is_reported_as_truncated(small_store):
    shard = shard_path(small_store, 0)
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    with pytest.raises(ValueError, match=rf"holds {size // 2} bytes but the manifest records {size}: it is truncated"):
        KVStore(small_store).batch([1])


def test_a_missing_shard_is_reported(small_store):
    shard_path(small_store, 1).unlink()
    with pytest.raises(ValueError, match=r"shard-00001-\w{16}.safetensors is missing; re-run the teacher_kv stage"):
        KVStore(small_store).batch([2])


def test_a_missing_manifest_is_reported(tmp_path):
    with pytest.raises(ValueError, match="no manifest.json in .*: not a finished KV store"):
        KVStore(tmp_path)


def test_a_manifest_that_is_not_json_is_reported(small_store):
    (small_store / "manifest.json").write_text("{broken")
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        KVStore(small_store)


def test_a_manifest_of_another_format_is_reported(small_store):
    (small_store / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="is not a kvlib KV store manifest"):
        KVStore(small_store)


@pytest.mark.parametrize("indices", [[], [3], [-1]])
def test_batch_rejects_indices_outside_the_store(small_store, indices):
    with pytest.raises(ValueError, match=r"non-empty list of example numbers in \[0, 3\)"):
        KVStore(small_store).batch(indices)


# write_store errors


def test_write_rejects_an_empty_shard_size(tmp_path):
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        write_store(tmp_path, [synthetic_batch(0, [3])], SPEC, {}, shard_size=0)


def test_write_rejects_a_dtype_other_than_half_or_single(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of torch.float16, torch.bfloat16, torch.float32"):
        write_store(tmp_path, [synthetic_batch(0, [3])], SPEC, {}, dtype=torch.float64)


@pytest.mark.parametrize("meta", [{"teacher": torch.tensor(1)}, ["not", "a", "dict"], {"x": float("nan")}])
def test_write_rejects_meta_that_json_cannot_hold(tmp_path, meta):
    with pytest.raises(ValueError, match="meta must be a dict that JSON can hold"):
        write_store(tmp_path, [synthetic_batch(0, [3])], SPEC, meta)


@pytest.mark.parametrize("drop, add", [("offsets", {}), (None, {"positions": torch.zeros(1, 2, 2)}), (None, {"x": 1})])
def test_write_rejects_batches_with_missing_or_unknown_keys(tmp_path, drop, add):
    batch = synthetic_batch(0, [3]) | add
    batch.pop(drop, None)
    with pytest.raises(ValueError, match=r"batch 0 has keys .*; expected \['attention_mask', 'ids', 'kv'"):
        write_store(tmp_path, [batch], SPEC, {})


def test_write_rejects_a_flat_attention_mask(tmp_path):
    batch = synthetic_batch(0, [3]) | {"attention_mask": torch.ones(3)}
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, T\), got shape \(3,\)"):
        write_store(tmp_path, [batch], SPEC, {})


def test_write_rejects_ids_that_do_not_match_the_batch(tmp_path):
    batch = synthetic_batch(0, [3, 2]) | {"ids": ["only-one"]}
    with pytest.raises(ValueError, match="ids must be a list of 2 strings"):
        write_store(tmp_path, [batch], SPEC, {})


@pytest.mark.parametrize("row", [[0, 1, 1], [0, 0, 0], [1, 0, 1]])
def test_write_rejects_masks_that_are_not_right_padded(tmp_path, row):
    batch = synthetic_batch(0, [3, 3]) | {"attention_mask": torch.tensor([[1, 1, 1], row])}
    with pytest.raises(ValueError, match=r"examples \[1\] are not right-padded .* padding_side='right'"):
        write_store(tmp_path, [batch], SPEC, {})


def test_write_rejects_offsets_of_the_wrong_shape(tmp_path):
    batch = synthetic_batch(0, [3]) | {"offsets": torch.zeros(1, 3)}
    with pytest.raises(ValueError, match=r"offsets must be \(B, T, 2\) = \(1, 3, 2\), got \(1, 3\)"):
        write_store(tmp_path, [batch], SPEC, {})


def test_write_rejects_segment_bounds_of_the_wrong_shape(tmp_path):
    batch = synthetic_batch(0, [3]) | {"segment_bounds": torch.tensor([[0]])}
    with pytest.raises(ValueError, match=r"segment_bounds must be \(B, S \+ 1\) with B=1, got \(1, 1\)"):
        write_store(tmp_path, [batch], SPEC, {})


@pytest.mark.parametrize("bounds", [[[1, 3]], [[0, 2, 1]], [[0, 4]]])
def test_write_rejects_segment_bounds_outside_the_example(tmp_path, bounds):
    batch = synthetic_batch(0, [3]) | {"segment_bounds": torch.tensor(bounds)}
    with pytest.raises(ValueError, match=r"must run from 0, never decrease and end within each example's tokens \[3\]"):
        write_store(tmp_path, [batch], SPEC, {})


def test_write_rejects_positions_and_kept_of_other_shapes(tmp_path):
    batch = synthetic_batch(0, [3]) | {"positions": torch.zeros(1, 3, 2), "kept": torch.ones(1, 3, 2)}
    with pytest.raises(ValueError, match=r"positions and kept must both be \(B, H, M\) with \(B, H\) = \(1, 2\)"):
        write_store(tmp_path, [batch], SPEC, {})


@pytest.mark.parametrize(
    "positions, kept",
    [
        ([0, 2], [False, True]),  # padding before a kept slot
        ([2, 1], [True, True]),  # not in time order
        ([1, 1], [True, True]),  # the same position twice
        ([0, 3], [True, True]),  # past the example's 3 tokens
    ],
)
def test_write_rejects_slots_not_in_select_slots_form(tmp_path, positions, kept):
    batch = synthetic_batch(0, [3])
    p, k = torch.tensor(positions).expand(1, 2, 2), torch.tensor(kept).expand(1, 2, 2)
    batch |= {"positions": p, "kept": k, "kv": [(x[:, :, :2],) * 2 for x, _ in batch["kv"]]}
    with pytest.raises(ValueError, match="kept slots must come first .* as compress.select_slots returns them"):
        write_store(tmp_path, [batch], SPEC, {})


def test_write_rejects_kv_with_another_layer_count(tmp_path):
    with pytest.raises(ValueError, match="kv has 2 layers but the spec says 3"):
        write_store(tmp_path, [synthetic_batch(0, [3])], KVSpec(3, 2, 4), {})


def test_write_rejects_kv_whose_shape_does_not_match_the_spec(tmp_path):
    batch = synthetic_batch(0, [3, 2], KVSpec(2, 4, 4))  # four KV heads, spec says two
    with pytest.raises(ValueError, match=r"layer 0 K has shape \(2, 4, 3, 4\), expected .* = \(2, 2, 3, 4\)"):
        write_store(tmp_path, [batch], SPEC, {})


def test_write_rejects_values_that_overflow_fp16(tmp_path):
    batch = synthetic_batch(0, [3])
    batch["kv"][1][0][0, 1, 2, 3] = 1e6
    with pytest.raises(ValueError, match=r"layer 1 K is not finite in torch.float16 \(largest \|x\| = 1e\+06\)"):
        write_store(tmp_path, [batch], SPEC, {})
    write_store(tmp_path, [batch], SPEC, {}, dtype=torch.bfloat16)  # bfloat16 holds it
    assert KVStore(tmp_path).batch([0])["kv"][1][0][0, 1, 2, 3] == pytest.approx(1e6, rel=1e-2)


def test_write_rejects_batches_of_different_layouts(tmp_path):
    other = synthetic_batch(1, [3]) | {"segment_bounds": torch.tensor([[0, 1, 3]])}
    with pytest.raises(ValueError, match="batch 1 has .*'segments': 2.* but the batches before it .*'segments': 1"):
        write_store(tmp_path, [synthetic_batch(0, [3]), other], SPEC, {})


def test_write_rejects_repeated_example_ids(tmp_path):
    with pytest.raises(ValueError, match=r"batch 1: example ids \['s1'\] appear more than once"):
        write_store(tmp_path, [synthetic_batch(0, [3, 3]), synthetic_batch(1, [2])], SPEC, {})
    within = synthetic_batch(0, [3, 3]) | {"ids": ["a", "a"]}
    with pytest.raises(ValueError, match=r"batch 0: example ids \['a'\] appear more than once"):
        write_store(tmp_path, [within], SPEC, {})


def test_write_rejects_an_empty_dataset(tmp_path):
    with pytest.raises(ValueError, match="kv_batches yielded no examples"):
        write_store(tmp_path, [], SPEC, {})
    assert not (tmp_path / "manifest.json").exists()


# a cache smaller than the store


@pytest.fixture
def four_shards(tmp_path):
    """8 examples of 4 tokens in 4 shards of the same size, so a cache of one shard's bytes holds one shard."""
    batches = [synthetic_batch(first, [4, 4, 4, 4]) for first in (0, 4)]
    return write_store(tmp_path, batches, SPEC, {}, shard_size=2)


def shard_bytes(directory) -> list[int]:
    return [entry["bytes"] for entry in json.loads((directory / "manifest.json").read_text())["shards"]]


BATCHES = [[0, 7], [2, 3, 4], [6, 1], [5], [7, 0, 3]]  # every shard, more than once, some batches spanning shards


def test_a_cache_of_one_shard_gives_the_same_batches_as_an_unbounded_one(four_shards):
    sizes = shard_bytes(four_shards)
    assert min(sizes) * 2 > max(sizes)  # any two shards exceed the bound
    bounded, unbounded = KVStore(four_shards, cache_bytes=max(sizes)), KVStore(four_shards)
    for indices in BATCHES:
        a, b = bounded.batch(indices), unbounded.batch(indices)
        for (k, v), (k0, v0) in zip(a["kv"], b["kv"], strict=True):
            assert torch.equal(k, k0) and torch.equal(v, v0)
        for name in ("mask", "attention_mask", "offsets", "segment_bounds"):
            assert torch.equal(a[name], b[name])
        assert len(bounded._cache) == 1 and bounded._cached_bytes() <= bounded.cache_bytes
    assert len(unbounded._cache) == 4


def test_the_cache_evicts_the_least_recently_used_shard(four_shards):
    store = KVStore(four_shards, cache_bytes=2 * max(shard_bytes(four_shards)))
    store.batch([0])  # shard 0
    store.batch([2])  # shard 1
    store.batch([1])  # shard 0 again: now the most recent
    store.batch([4])  # shard 2 evicts shard 1
    assert list(store._cache) == [0, 2]


def count_calls(monkeypatch, name: str) -> Counter:
    """Count the calls of ``kvlib.kvstore.<name>`` by the file they read."""
    calls, real = Counter(), getattr(kvstore, name)

    def counted(path, *args, **kwargs):
        calls[Path(path).name] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(kvstore, name, counted)
    return calls


def test_each_shard_is_hashed_once_per_store_across_evictions(four_shards, monkeypatch):
    hashed, loaded = count_calls(monkeypatch, "_sha256"), count_calls(monkeypatch, "load_file")
    store = KVStore(four_shards, cache_bytes=max(shard_bytes(four_shards)))
    for indices in BATCHES:
        store.batch(indices)
    files = [entry["file"] for entry in store._shards]
    assert hashed == Counter(files)  # once each
    assert sum(loaded.values()) > len(files)  # though evicted shards were read again
    KVStore(four_shards).batch([0])
    assert hashed[files[0]] == 2  # once per KVStore: a new one verifies again


def corrupt_in_place(path) -> None:
    """Flip a byte of the tensor data, keeping size and inode, as an edit a second later would."""
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    mtime = path.stat().st_mtime_ns
    path.write_bytes(bytes(data))
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # a later edit; a same-tick edit keeps the mtime and goes unseen


def corrupt_by_replacing(path) -> None:
    """Replace the file by a corrupted copy: same size and name, another inode."""
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    copy = path.with_suffix(".copy")
    copy.write_bytes(bytes(data))
    os.replace(copy, path)


@pytest.mark.parametrize("corrupt", [corrupt_in_place, corrupt_by_replacing])
def test_a_shard_corrupted_after_it_was_verified_and_evicted_is_refused_on_re_read(four_shards, corrupt):
    store = KVStore(four_shards, cache_bytes=max(shard_bytes(four_shards)))
    store.batch([0])  # shard 0 verified
    store.batch([2])  # and evicted
    corrupt(shard_path(four_shards, 0))
    with pytest.raises(ValueError, match=r"shard-00000-\w{16}.safetensors fails its checksum"):
        store.batch([1])


def test_a_shard_rewritten_with_the_same_bytes_after_eviction_is_verified_again_and_read(four_shards, monkeypatch):
    store = KVStore(four_shards, cache_bytes=max(shard_bytes(four_shards)))
    first = store.batch([0])
    store.batch([2])  # shard 0 evicted
    path = shard_path(four_shards, 0)
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)  # another file, the same bytes
    hashed = count_calls(monkeypatch, "_sha256")
    assert torch.equal(store.batch([0])["kv"][1][1], first["kv"][1][1])
    assert hashed == Counter([path.name])


@pytest.mark.parametrize("cache_bytes", [0, -1, 1.5, True, "1000"])
def test_a_cache_bound_that_is_not_a_positive_int_is_refused(four_shards, cache_bytes):
    with pytest.raises(ValueError, match="cache_bytes .* must be a positive int or None"):
        KVStore(four_shards, cache_bytes=cache_bytes)


def test_a_cache_bound_smaller_than_the_largest_shard_is_refused_naming_it(four_shards):
    largest = max(shard_bytes(four_shards))
    with pytest.raises(
        ValueError,
        match=rf"cache_bytes={largest - 1} cannot hold the store's largest shard, shard-\d{{5}}-\w{{16}}.safetensors "
        rf"of {largest} bytes; give at least that, or write the store with a smaller shard_size",
    ):
        KVStore(four_shards, cache_bytes=largest - 1)
