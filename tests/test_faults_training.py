"""Faults during training (issue #10): a SIGKILL at every point of the checkpoint sequence and during a metrics
append, non-finite losses and gradients, a checkpoint of another configuration, a planted pickle.

Kills are real: a forked child trains with a hook that sends itself SIGKILL at a controlled point; the parent
then resumes in the same folder from fresh weights and must end bit-identical to an uninterrupted run (one
thread in both, so both compute in the same order)."""

import json
import multiprocessing
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvlib.batches import collate_fn
from kvlib.config import ModelShape, TrainConfig
from kvlib.data import generate
from kvlib.distill import Distiller, KVConfig, TeacherAligner
from kvlib.hf import kv_spec
from kvlib.layers import layer_map
from kvlib.teacher_kv import extract_store
from kvlib.text import train_tokenizer
from kvlib.train import train

CFG = TrainConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, log_every=1, save_every=2, share_every=0)
EXAMPLES = generate(16, seed=0, max_operand=9)
TOKENIZER = train_tokenizer("char", [e.text for e in EXAMPLES])


def ce_run(seed: int = 0):
    """A CE-only student and its collate; ``seed`` sets the initial weights (a resume must overwrite them)."""
    model = ModelShape("llama", 2, 4, 2, 8, 32).build(len(TOKENIZER), seed=seed)
    return Distiller(model), collate_fn(TOKENIZER, EXAMPLES)


@contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rows(out: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "seconds"}
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


def leftovers(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.name.startswith("checkpoint")}


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at(point: str) -> None:
    """Install, in this (child) process, a hook that SIGKILLs it at ``point`` of the second checkpoint (step 4)
    or while appending the metrics line of step 3."""
    replace, rmtree, open_ = os.replace, shutil.rmtree, Path.open

    def replace_then_die(src, dst):
        replace(src, dst)
        if point == "moved to old" and Path(dst).name == "checkpoint.old":
            die()
        if point == "new in place" and Path(src).name == "checkpoint.tmp" and Path(dst).with_suffix(".old").exists():
            die()

    def rmtree_partly(path, *args, **kwargs):
        if point == "removing old" and Path(path).name == "checkpoint.old" and Path(path).exists():
            (Path(path) / "model.safetensors").unlink()
            die()
        rmtree(path, *args, **kwargs)

    class Torn:  # a metrics file whose step-3 line is cut in half by the kill
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            if json.loads(text)["step"] == 3:
                self.f.write(text[: len(text) // 2])
                self.f.flush()
                die()
            self.f.write(text)

    def open_torn(self, mode="r", *args, **kwargs):
        f = open_(self, mode, *args, **kwargs)
        return Torn(f) if point == "appending metrics" and self.name == "metrics.jsonl" and mode == "a" else f

    os.replace, shutil.rmtree, Path.open = replace_then_die, rmtree_partly, open_torn


def killed_run(out: Path, point: str) -> None:
    torch.set_num_threads(1)
    kill_at(point)
    distiller, collate = ce_run()
    train(distiller, collate, len(EXAMPLES), CFG, out, progress=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    distiller, collate = ce_run()
    with one_thread():
        train(distiller, collate, len(EXAMPLES), CFG, out, progress=False)
    return distiller, rows(out)


LEFT = {  # what each kill leaves: the checkpoint folders, and whether metrics.jsonl ends in a torn line
    "moved to old": ({"checkpoint.old", "checkpoint.tmp"}, False),
    "new in place": ({"checkpoint", "checkpoint.old"}, False),
    "removing old": ({"checkpoint", "checkpoint.old"}, False),
    "appending metrics": ({"checkpoint"}, True),
}


@pytest.mark.parametrize("point", list(LEFT))
def test_a_run_killed_while_checkpointing_or_logging_resumes_to_the_uninterrupted_parameters(
    uninterrupted, tmp_path, point
):
    child = multiprocessing.get_context("fork").Process(target=killed_run, args=(tmp_path, point))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    assert (leftovers(tmp_path), not (tmp_path / "metrics.jsonl").read_text().endswith("\n")) == LEFT[point]
    resumed, collate = ce_run(seed=7)  # other weights: everything must come from the checkpoint
    with one_thread():
        summary = train(resumed, collate, len(EXAMPLES), CFG, tmp_path, progress=False)
    full, full_rows = uninterrupted
    assert summary["finished"] and leftovers(tmp_path) == {"checkpoint"}
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))
    assert rows(tmp_path) == full_rows


def killed_saving_the_model(out: Path) -> None:
    """Train to the end, but die half-way through writing the final model's weights."""
    torch.set_num_threads(1)
    distiller, collate = ce_run()
    save = type(distiller.student).save_pretrained

    def save_half_then_die(self, directory, **kwargs):
        save(self, directory, **kwargs)
        weights = Path(directory) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        die()

    type(distiller.student).save_pretrained = save_half_then_die
    train(distiller, collate, len(EXAMPLES), CFG, out, progress=False)


def test_a_run_killed_while_saving_the_final_model_leaves_no_model_and_the_rerun_saves_it(uninterrupted, tmp_path):
    child = multiprocessing.get_context("fork").Process(target=killed_saving_the_model, args=(tmp_path,))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    assert not (tmp_path / "model").exists() and (tmp_path / "model.tmp").exists()  # never a half-written model/
    resumed, collate = ce_run(seed=7)
    with one_thread():
        assert train(resumed, collate, len(EXAMPLES), CFG, tmp_path, progress=False)["finished"]
    saved = load_file(tmp_path / "model" / "model.safetensors")
    full, _ = uninterrupted
    expected = {n.removeprefix("student."): t for n, t in full.state_dict().items() if n.startswith("student.")}
    assert saved.keys() <= expected.keys() and all(torch.equal(saved[n], expected[n]) for n in saved)
    assert not (tmp_path / "model.tmp").exists()


def test_a_checkpoint_written_by_another_config_is_refused_with_the_fix(tmp_path):
    distiller, collate = ce_run()
    group = {"teachers": ["A"], "kv": {"weight": 1.0}}
    train(distiller, collate, len(EXAMPLES), CFG, tmp_path, stop_at=2, progress=False, fingerprint={"group": group})
    changes = [
        (CFG, {"group": {"teachers": ["A"], "kv": {"weight": 0.5}}}, r"run\.group\.kv\.weight: 1\.0 -> 0\.5"),
        (TrainConfig(**{**vars(CFG), "lr": 1e-2}), {"group": group}, r"train\.lr: 0\.003 -> 0\.01"),
        (TrainConfig(**{**vars(CFG), "steps": 8}), {"group": group}, r"train\.steps: 6 -> 8"),
    ]
    for cfg, fingerprint, differ in changes:
        with pytest.raises(ValueError, match=rf"another configuration \({differ}\); delete .* to train afresh, or"):
            train(distiller, collate, len(EXAMPLES), cfg, tmp_path, progress=False, fingerprint=fingerprint)


def test_a_finished_folder_rerun_trains_no_step_with_its_config_and_refuses_another(tmp_path):
    first, collate = ce_run()
    train(first, collate, len(EXAMPLES), CFG, tmp_path, progress=False, fingerprint={"seed": 0})
    metrics = (tmp_path / "metrics.jsonl").read_text()
    again, collate = ce_run(seed=7)
    summary = train(again, collate, len(EXAMPLES), CFG, tmp_path, progress=False, fingerprint={"seed": 0})
    assert summary["finished"] and (tmp_path / "metrics.jsonl").read_text() == metrics
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), again.parameters()))
    with pytest.raises(ValueError, match=r"another configuration \(run\.seed: 0 -> 1\)"):
        train(again, collate, len(EXAMPLES), CFG, tmp_path, progress=False, fingerprint={"seed": 1})


class Planted:
    """A pickle that, when loaded, creates ``marker`` (it could run any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_pickle_planted_in_the_checkpoint_is_refused_and_never_loaded(tmp_path):
    distiller, collate = ce_run()
    out = tmp_path / "run"
    train(distiller, collate, len(EXAMPLES), CFG, out, stop_at=2, progress=False)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert not list((out / "checkpoint").glob("custom_checkpoint_*")) and state["scheduler"]["last_epoch"] == 2
    torch.save(Planted(tmp_path / "marker"), out / "checkpoint" / "custom_checkpoint_0.pkl")
    with pytest.raises(ValueError, match=r"holds \['custom_checkpoint_0\.pkl'\], which kvlib never writes"):
        train(distiller, collate, len(EXAMPLES), CFG, out, progress=False)
    assert not (tmp_path / "marker").exists()


def kv_run(tmp_path: Path):
    """A student distilled from a tiny teacher's KV store."""
    teacher = ModelShape("qwen2", 3, 4, 2, 16, 64).build(len(TOKENIZER), seed=1)
    store = extract_store(teacher, TOKENIZER, EXAMPLES, tmp_path / "store", batch_size=8, progress=False)
    student = ModelShape("llama", 2, 4, 1, 8, 32).build(len(TOKENIZER), seed=0)
    kv = KVConfig()
    aligner = TeacherAligner(store.spec, kv_spec(student.config), layer_map(3, 2), kv.projector, kv.time_align)
    return Distiller(student, [aligner], kv), collate_fn(TOKENIZER, EXAMPLES, [store])


def assert_stopped_at_the_checkpoint(distiller: Distiller, out: Path, step: int) -> None:
    """Nothing was trained or written after the last good checkpoint, of ``step``."""
    checkpoint = load_file(out / "checkpoint" / "model.safetensors")
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == step
    assert all(torch.equal(p, checkpoint[name]) for name, p in distiller.state_dict().items() if name in checkpoint)
    assert leftovers(out) == {"checkpoint"} and not (out / "model").exists()
    assert [r["step"] for r in rows(out)] == list(range(1, step + 1))


def test_non_finite_teacher_kv_stops_training_naming_the_term_and_the_step(tmp_path):
    distiller, collate = kv_run(tmp_path)
    forward, calls = distiller.forward, []

    def poisoned(batch):  # teacher KV turned NaN from the third micro-batch (step 3) on; checksums are not involved
        calls.append(1)
        if len(calls) >= 3:
            k, v = batch["teachers"][0]["kv"][0]
            batch["teachers"][0]["kv"][0] = (k * float("nan"), v)
        return forward(batch)

    distiller.forward = poisoned
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="kv is nan at step 3; .* the checkpoint of step 2 is kept. Likely"):
        train(distiller, collate, len(EXAMPLES), CFG, out, progress=False)
    assert_stopped_at_the_checkpoint(distiller, out, 2)


def test_a_non_finite_gradient_stops_training_before_the_optimizer_step(tmp_path):
    distiller, collate = ce_run()
    calls = []

    def poison(grad):  # a finite loss whose gradient is NaN at step 3
        calls.append(1)
        return grad * float("nan") if len(calls) == 3 else grad

    distiller.student.model.embed_tokens.weight.register_hook(poison)
    with pytest.raises(FloatingPointError, match=r"gradient norm is nan at step 3; .* a learning rate too high"):
        train(distiller, collate, len(EXAMPLES), CFG, tmp_path, progress=False)
    assert_stopped_at_the_checkpoint(distiller, tmp_path, 2)


def test_a_learning_rate_far_too_high_stops_training_instead_of_finishing_with_nan(tmp_path):
    distiller, collate = ce_run()
    cfg = TrainConfig(**{**vars(CFG), "lr": 1e3})
    with pytest.raises(FloatingPointError, match=r"gradient norm is nan at step 2; .* no checkpoint .* \(lr=1000\.0\)"):
        train(distiller, collate, len(EXAMPLES), cfg, tmp_path, progress=False)
    assert all(torch.isfinite(p).all() for p in distiller.parameters())
