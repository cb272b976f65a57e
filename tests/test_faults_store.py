"""Faults around KV stores: a rewrite that fails or is killed never destroys the good store there, a damaged or
edited store is refused with the field or tensor and the fix named, and training refuses a store extracted
from other examples or a group naming a teacher that has no store."""

import errno
import json
import os
import signal
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_kvstore import SPEC, shard_path, synthetic_batch
from tiny import tiny

from kvlib import kvstore
from kvlib.data import load_splits, prepare_data, split_sha256
from kvlib.kvstore import KVStore, _sha256, write_store
from kvlib.student import train_student
from kvlib.teacher_kv import extract_store, tokenizer_sha256, weights_sha256
from kvlib.text import train_tokenizer


def old_batches() -> list[dict]:
    return [synthetic_batch(0, [3, 5]), synthetic_batch(2, [4])]


def new_batches() -> list[dict]:
    return [synthetic_batch(0, [2, 4]), synthetic_batch(2, [3, 2]), synthetic_batch(4, [5])]


@pytest.fixture
def store(tmp_path) -> Path:
    """A good store of 3 examples in 2 shards, about to be rewritten."""
    return write_store(tmp_path / "A", old_batches(), SPEC, {"run": 1}, shard_size=2)


def read_all(directory) -> dict:
    s = KVStore(directory)
    return s.batch(range(len(s)))


def assert_same(a: dict, b: dict) -> None:
    for (k, v), (k0, v0) in zip(a["kv"], b["kv"], strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    for name in ("mask", "attention_mask", "offsets", "segment_bounds"):
        assert torch.equal(a[name], b[name])


def files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def manifest_files(directory) -> list[str]:
    """What a finished store holds: its manifest and the shards it names, nothing else."""
    manifest = json.loads((directory / "manifest.json").read_text())
    return sorted(["manifest.json"] + [s["file"] for s in manifest["shards"]])


# rewrites that fail


def test_a_rewrite_that_fails_on_a_bad_batch_leaves_the_previous_store_intact(store):
    before, listing = read_all(store), files(store)
    bad = new_batches()
    bad[1]["kv"][0][1][0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"batch 1: layer 0 V is not finite in torch.float16"):
        write_store(store, bad, SPEC, {"run": 2}, shard_size=2)  # shard 0 of the new store was written by then
    assert_same(read_all(store), before)
    assert KVStore(store).meta == {"run": 1} and files(store) == listing


def test_a_rewrite_that_runs_out_of_disk_leaves_the_previous_store_intact_and_raises(store, monkeypatch):
    before, listing = read_all(store), files(store)
    calls = []

    def disk_full_on_the_second_shard(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\0" * 10)  # what a full disk leaves of the file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        save_file(tensors, path)

    monkeypatch.setattr("kvlib.kvstore.save_file", disk_full_on_the_second_shard)
    with pytest.raises(OSError, match="No space left on device") as err:
        write_store(store, new_batches(), SPEC, {"run": 2}, shard_size=2)
    assert err.value.errno == errno.ENOSPC and len(calls) == 2
    assert_same(read_all(store), before)
    assert KVStore(store).meta == {"run": 1} and files(store) == listing


# writes killed by SIGKILL in a child process


def killed(write) -> None:
    """Run ``write()`` in a forked child that SIGKILLs itself at the point under test, and wait for the kill."""
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)  # a child stuck anywhere dies of SIGALRM, which fails the assertion below
        torch.set_num_threads(1)  # as DataLoader workers do: the parent's thread pool is not the child's
        try:
            write()
        except BaseException:
            traceback.print_exc()
        os._exit(3)  # the kill point was never reached
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child status {status}"


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def batches_then_kill(batches: list[dict]):
    """The batches, with a kill while the write asks for the second one (its first shard written by then)."""
    yield batches[0]
    kill_self()
    yield from batches[1:]


def kill_around_the_manifest_replace(after: bool):
    """Patch ``os.replace`` (in the child) to kill the process right before or right after the manifest moves in."""
    replace = os.replace

    def replace_then_maybe_kill(src, dst):
        if Path(dst).name == "manifest.json" and not after:
            kill_self()
        replace(src, dst)
        if Path(dst).name == "manifest.json" and after:
            kill_self()

    os.replace = replace_then_maybe_kill


@pytest.mark.parametrize("point", ["in the batches", "before the manifest replace", "after the manifest replace"])
def test_a_rewrite_killed_at_any_point_leaves_a_complete_store_and_the_next_write_cleans_up(store, point):
    before, batches = read_all(store), new_batches()

    def rewrite():
        if point != "in the batches":
            kill_around_the_manifest_replace(after=point == "after the manifest replace")
        write_store(store, batches_then_kill(batches) if point == "in the batches" else batches, SPEC, {"run": 2}, 2)

    killed(rewrite)
    assert files(store) != manifest_files(store)  # the killed write left shards behind
    if point == "after the manifest replace":  # the new store is complete: it is the one there
        assert KVStore(store).meta == {"run": 2} and len(KVStore(store)) == 5
        fresh = write_store(store.parent / "fresh", batches, SPEC, {"run": 2}, 2)
        assert_same(read_all(store), read_all(fresh))
    else:
        assert KVStore(store).meta == {"run": 1}
        assert_same(read_all(store), before)
    write_store(store, batches, SPEC, {"run": 3}, shard_size=2)
    assert files(store) == manifest_files(store) and KVStore(store).meta == {"run": 3}


def test_a_first_write_killed_inside_a_shard_save_reads_as_unfinished_and_the_next_write_clears_its_debris(tmp_path):
    directory = tmp_path / "A"

    def write_killed_in_the_second_save():
        calls = []

        def save_then_die(tensors, path):  # the first shard is saved whole, the second half-way
            calls.append(path)
            save_file(tensors, path)
            if len(calls) == 2:
                Path(path).write_bytes(Path(path).read_bytes()[:50])
                kill_self()

        kvstore.save_file = save_then_die
        write_store(directory, new_batches(), SPEC, {}, shard_size=2)

    killed(write_killed_in_the_second_save)
    assert len(list(directory.iterdir())) == 2  # the first shard and the half-written second
    with pytest.raises(ValueError, match="no manifest.json in .*: not a finished KV store"):
        KVStore(directory)
    write_store(directory, old_batches(), SPEC, {}, shard_size=2)
    assert files(directory) == manifest_files(directory) and len(KVStore(directory)) == 3


# damaged or edited stores


def edit_manifest(directory, edit) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def edit_shard(directory, number: int, edit) -> None:
    """Change shard ``number``'s tensors with ``edit`` and record its new size and checksum in the manifest, so that
    only the tensors' content disagrees with the store."""
    path = shard_path(directory, number)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)

    def sign(manifest):
        manifest["shards"][number] |= {"bytes": path.stat().st_size, "sha256": _sha256(path)}

    edit_manifest(directory, sign)


@pytest.mark.parametrize("value, name", [(float("nan"), "k"), (float("inf"), "v"), (-float("inf"), "k")])
def test_non_finite_kv_under_an_intact_checksum_is_refused_naming_shard_layer_and_k_or_v(store, value, name):
    def poison(tensors):
        tensors[f"{name}.1"][1, 0, 3] = value

    edit_shard(store, 1, poison)
    s = KVStore(store)
    s.batch([0, 1])  # shard 0 is finite
    with pytest.raises(
        ValueError,
        match=rf"shard-00001-\w{{16}}.safetensors: layer 1 {name.upper()} holds 1 non-finite values \(NaN or Inf\) "
        r"under an intact checksum.*examples \[2, 3\).*re-run the teacher_kv stage",
    ):
        s.batch([2])


def drop(field):
    return lambda m: m.pop(field)


def put(*keys_and_value):
    *keys, value = keys_and_value

    def edit(manifest):
        for key in keys[:-1]:
            manifest = manifest[key]
        manifest[keys[-1]] = value

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (drop("ids"), r"the manifest lacks the fields \['ids'\]"),
        (drop("shards"), r"the manifest lacks the fields \['shards'\]"),
        (put("spec", [2, 2, 4]), r"manifest field 'spec' must be of type dict, got \[2, 2, 4\]"),
        (put("compressed", "no"), r"manifest field 'compressed' must be of type bool, got 'no'"),
        (put("num_examples", 3.0), r"manifest field 'num_examples' must be of type int, got 3.0"),
        (put("spec", "head_dim", 0), r"manifest field 'spec' must hold the positive integers \['num_layers', "),
        (lambda m: m["spec"].pop("head_dim"), r"'spec' must hold the positive integers"),
        (put("dtype", "float64"), r"manifest field 'dtype' must be one of \['float16', 'bfloat16', 'float32'\]"),
        (put("num_examples", 4), r"manifest field 'ids' holds 3 ids but 'num_examples' is 4"),
        (put("ids", ["s0", "s0", "s2"]), r"manifest field 'ids' must hold unique strings"),
        (put("ids", ["s0", 1, "s2"]), r"manifest field 'ids' must hold unique strings"),
        (put("shards", 0, "stop", "2"), r"manifest field 'shards' entry 0 must hold \{'file': 'str', 'start': 'int'"),
        (lambda m: m["shards"][1].pop("sha256"), r"manifest field 'shards' entry 1 must hold"),
        (put("shards", 1, "start", 3), r"'shards' entry 1 holds examples \[3, 3\) but must start at 2"),
        (put("shards", 0, "start", 1), r"'shards' entry 0 holds examples \[1, 2\) but must start at 0"),
        (lambda m: m["shards"].pop(), r"manifest field 'shards' covers examples \[0, 2\) but 'num_examples' is 3"),
    ],
)
def test_a_manifest_with_a_missing_or_inconsistent_field_is_refused_at_open(store, edit, message):
    edit_manifest(store, edit)
    with pytest.raises(ValueError, match=message + r".*the store is damaged or was edited, re-run the teacher_kv"):
        KVStore(store)


EDITED = r".*the manifest was edited or belongs to other shards, re-run the teacher_kv stage"


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            put("spec", "num_layers", 3),
            r"holds the tensors \[\] the manifest does not describe and lacks \['k.2', 'v.2'\]",
        ),
        (
            put("spec", "num_layers", 1),
            r"holds the tensors \['k.1', 'v.1'\] the manifest does not describe and lacks \[\]",
        ),
        (put("compressed", True), r"holds the tensors \[\] .* and lacks \['kept', 'positions'\]"),
        (put("spec", "num_kv_heads", 1), r"k.0 has shape \(2, 8, 4\) but \(1, 8, 4\) follows from the manifest's spec"),
        (put("spec", "head_dim", 8), r"k.0 has shape \(2, 8, 4\) but \(2, 8, 8\) follows"),
        (put("dtype", "float32"), r"k.0 is torch.float16 but the manifest says torch.float32"),
        (
            lambda m: (put("shards", 0, "stop", 1)(m), put("shards", 1, "start", 1)(m)),
            r"lengths, slots and segment_bounds have shapes \[\(2,\), \(2,\), \(2, 2\)\] but the manifest gives the "
            r"shard the 1 examples \[0, 1\), so they must be \(1,\), \(1,\) and \(1, S \+ 1\)",
        ),
    ],
)
def test_a_manifest_that_disagrees_with_its_shards_is_refused_when_the_shard_is_read(store, edit, message):
    edit_manifest(store, edit)
    s = KVStore(store)  # cheap checks pass: the disagreement shows in the shard's tensors
    with pytest.raises(ValueError, match=message + EDITED):
        s.batch([0])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("v.0"), r"holds the tensors \[\] the manifest does not describe and lacks \['v.0'\]"),
        (lambda t: t.update(offsets=t["offsets"][:-1]), r"offsets has shape \(7, 2\) but \(8, 2\) follows"),
        (lambda t: t.update(slots=t["slots"] - 1), r"k.0 has shape \(2, 8, 4\) but \(2, 6, 4\) follows"),
        (lambda t: t.update(slots=t["slots"].flip(0)), r"slots differ from lengths in an uncompressed store"),
        (lambda t: t.update(lengths=t["lengths"][:1]), r"shapes \[\(1,\), \(2,\), \(2, 2\)\] but the manifest gives"),
    ],
)
def test_a_shard_whose_tensors_disagree_with_the_manifest_is_refused_under_an_intact_checksum(store, edit, message):
    edit_shard(store, 0, edit)
    with pytest.raises(ValueError, match=message + EDITED):
        KVStore(store).batch([0])


# provenance: what a store was extracted from, and what training accepts

STUDENT = {
    "shape": {"family": "llama", "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 8, "hidden_size": 16},
    "tokenizer": {"kind": "char", "vocab_size": None},
    "train": {"steps": 1, "batch_size": 2, "warmup_steps": 0, "log_every": 1, "save_every": 10, "share_every": 0},
    "max_new_tokens": 4,
}
SIZES = {"teacher_train": 2, "student_train": 6, "validation": 0, "test": 1}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two data folders whose student splits share their ids (seeds 0 and 1), and teacher A's store over seed 0's."""
    root = tmp_path_factory.mktemp("study")
    splits = {seed: prepare_data(SIZES, seed, 9, root / f"data-{seed}") for seed in (0, 1)}
    examples = load_splits(root / "data-0")["student_train"]
    tokenizer = train_tokenizer("char", [e.text for e in examples])
    teacher = tiny("llama-gqa", vocab_size=len(tokenizer))
    extract_store(teacher, tokenizer, examples, root / "kv" / "A", batch_size=4, progress=False)
    return root, splits, examples, tokenizer, teacher


def test_extract_store_records_the_hashes_of_its_examples_tokenizer_and_teacher(study):
    root, splits, examples, tokenizer, teacher = study
    meta = KVStore(root / "kv" / "A").meta
    assert meta["examples_sha256"] == split_sha256(examples) == splits[0]["student_train"]["sha256"]
    assert meta["tokenizer_sha256"] == tokenizer_sha256(tokenizer)
    assert meta["teacher_sha256"] == weights_sha256(teacher)
    other = tiny("llama-gqa", vocab_size=len(tokenizer))
    with torch.no_grad():
        other.model.norm.weight[0] += 1  # one weight differs
    assert (
        weights_sha256(other) != meta["teacher_sha256"] == weights_sha256(tiny("llama-gqa", vocab_size=len(tokenizer)))
    )
    assert tokenizer_sha256(train_tokenizer("char", [e.text for e in examples] + ["@"])) != meta["tokenizer_sha256"]


def test_training_refuses_a_store_extracted_over_a_split_of_another_data_seed(study, tmp_path):
    root, splits, examples, _, _ = study
    theirs, ours = splits[0]["student_train"]["sha256"], splits[1]["student_train"]["sha256"]
    assert KVStore(root / "kv" / "A").ids == [e.id for e in examples]  # the ids agree: only the hash tells
    with pytest.raises(
        ValueError,
        match=rf"the KV store of teacher A was extracted over other examples \(sha256 {theirs}\) than the "
        rf"student-training split \(sha256 {ours}\); re-run the teacher_kv stage for A",
    ):
        train_student(STUDENT, {"teachers": ["A"], "kv": {}}, 0, root / "data-1", tmp_path, root / "kv")


def test_training_refuses_a_store_that_records_no_examples_hash(study, tmp_path):
    root = study[0]
    (tmp_path / "kv").mkdir()
    legacy = tmp_path / "kv" / "A"
    write_store(legacy, [synthetic_batch(0, [3])], SPEC, {"pre_rope": True})
    with pytest.raises(ValueError, match=r"extracted over other examples \(sha256 not recorded\) than the student"):
        train_student(STUDENT, {"teachers": ["A"], "kv": {}}, 0, root / "data-0", tmp_path / "out", tmp_path / "kv")


def test_a_group_naming_a_teacher_without_a_store_names_the_stores_that_exist_and_the_params(study, tmp_path):
    root = study[0]
    kv_root = tmp_path / "kv"
    (kv_root / "half").mkdir(parents=True)  # a folder without a manifest is no store
    (kv_root / "A").symlink_to(root / "kv" / "A")
    with pytest.raises(
        ValueError,
        match=r"the group names teacher 'C' but no KV store exists at .*kv/C \(stores there: \['A'\]\); 'C' must be "
        r"a teacher of the study \(teacher.teachers and study.teachers in the params\)",
    ):
        train_student(
            STUDENT,
            {"teachers": ["A", "C"], "kv": {}, "fusion": {"kind": "router"}},
            0,
            root / "data-0",
            tmp_path / "out",
            kv_root,
        )


def test_a_group_with_teachers_needs_the_folder_of_their_stores(study, tmp_path):
    with pytest.raises(ValueError, match=r"the group names teachers \['A'\] but no kv_root was given; pass the"):
        train_student(STUDENT, {"teachers": ["A"], "kv": {}}, 0, study[0] / "data-0", tmp_path)
