"""The pipeline's stages as plain functions (the notebooks call these): data, teachers, teacher KV, students.

Every stage reads what the previous one wrote (JSONL splits, local checkpoints, KV stores) and writes
its own folder, so each can run alone, in a notebook, under DVC or under ``accelerate launch``:

- ``prepare_data``: the embedded task's disjoint splits (or a GSM8K JSONL as the test split), with
  the SHA-256 of each split in ``splits.json``;
- ``train_teacher``: a tokenizer trained on the teacher-training split, a model built from its shape,
  trained with CE on prompt + reasoning + answer, saved (``model/``, ``tokenizer/`` apart, see the
  tokenizer trap in REFERENCE.md) and evaluated on the test split;
- ``extract_teacher_kv``: the teacher's KV over the student-training split, as a KV store;
- ``train_student``: one student (one group, one seed) trained with CE and, when the group names
  teachers, the KV loss against their stores (fused when several); a store extracted over other
  examples than the student-training split (its recorded ``examples_sha256``) is refused;
- ``evaluate_student``: greedy decoding of a trained student on the test split.

Models are built from a shape (tiny models of real families, trained here) or loaded from a local
checkpoint directory (``path``: real models; a teacher without a ``train`` section is used as it is).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from accelerate import PartialState

from kvlib.config import GroupConfig, ModelConfig, from_dict
from kvlib.data import TASKS, load_gsm8k, load_jsonl, make_splits, save_jsonl, split_sha256
from kvlib.distill import Distiller, TeacherAligner, collate_fn
from kvlib.evaluate import accuracy, evaluate
from kvlib.files import write_json
from kvlib.fusion import make_fusion
from kvlib.hf import kv_spec
from kvlib.kvstore import KVStore
from kvlib.layers import layer_map
from kvlib.models import check_vocabulary, load_model
from kvlib.teacher_kv import extract_store
from kvlib.text import load_tokenizer, save_tokenizer, train_tokenizer
from kvlib.train import train

SPLITS = ("teacher_train", "student_train", "validation", "test")


def prepare_data(sizes: dict, seed: int, max_operand: int, out_dir: str | Path, gsm8k_test: str = "") -> dict:
    """Write ``{split}.jsonl`` for the four splits and ``splits.json`` (sizes, SHA-256); return the latter."""
    missing = sorted(set(SPLITS) - set(sizes))
    if missing:
        raise ValueError(f"sizes lack splits {missing}; give sizes for all of {SPLITS}")
    splits = make_splits(sizes, seed, max_operand=max_operand)
    if gsm8k_test:
        splits["test"] = load_gsm8k(gsm8k_test)
    out = Path(out_dir)
    for name, examples in splits.items():
        save_jsonl(examples, out / f"{name}.jsonl")
    summary = {
        name: {"n": len(ex), "sha256": split_sha256(ex), "tasks": sorted({e.task for e in ex})}
        for name, ex in splits.items()
    }
    write_json(out / "splits.json", summary)
    return summary


def load_splits(data_dir: str | Path) -> dict:
    return {name: load_jsonl(Path(data_dir) / f"{name}.jsonl") for name in SPLITS}


def _build(cfg: ModelConfig, texts: list[str], seed: int):
    """A model and its tokenizer: from the checkpoint ``cfg.path``, or built from ``cfg.shape`` with a
    tokenizer trained on ``texts``."""
    if cfg.path:
        model, tokenizer = load_model(cfg.path), load_tokenizer(cfg.path)  # trained by accelerate, which places it
        check_vocabulary(model, tokenizer)
        return model, tokenizer
    tokenizer = train_tokenizer(cfg.tokenizer.kind, texts, cfg.tokenizer.vocab_size)
    return cfg.shape.build(len(tokenizer), seed), tokenizer


def _validation(model, tokenizer, examples: list, max_new_tokens: int):
    """The training loop's validation callback: greedy exact-match accuracy on ``examples`` (none: no callback)."""
    if not examples:
        return None
    return lambda: {"accuracy": accuracy(model, tokenizer, examples, max_new_tokens)}


def load_trained(model_dir: str | Path, inference: bool = False):
    """The model and tokenizer a teacher or student stage left in ``model_dir``: ``model/`` and ``tokenizer/``,
    or, for a checkpoint used as it is, the directory named in ``checkpoint.json``. For ``inference`` on a
    machine with a GPU the model is put there in bfloat16 (real checkpoints); on a CPU it stays float32."""
    model_dir = Path(model_dir)
    pointer = model_dir / "checkpoint.json"
    if not pointer.exists() and not (model_dir / "model").is_dir():
        raise ValueError(
            f"{model_dir.name} was not trained: no {model_dir / 'model'} (nor a checkpoint.json); run its train stage"
        )
    path = json.loads(pointer.read_text())["path"] if pointer.exists() else model_dir / "model"
    gpu = inference and torch.cuda.is_available()
    model = load_model(path, torch.bfloat16 if gpu else None)
    tokenizer = load_tokenizer(path if pointer.exists() else model_dir / "tokenizer")
    check_vocabulary(model, tokenizer)
    return (model.to("cuda") if gpu else model), tokenizer


def train_teacher(params: dict, data_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict:
    """Train one teacher on the teacher-training split (or take a checkpoint as it is); evaluate it on test."""
    cfg = ModelConfig.from_params(params)
    splits, out = load_splits(data_dir), Path(out_dir)
    examples = splits["teacher_train"]
    seconds = 0.0
    if cfg.train is None:
        write_json(out / "checkpoint.json", {"path": str(Path(cfg.path).resolve())})
        model, tokenizer = load_trained(out, inference=True)
        kv_spec(model.config)  # a model without an attention KV cache is refused before any work
    else:
        model, tokenizer = _build(cfg, [e.text for e in examples], cfg.train.seed)
        kv_spec(model.config)
        save_tokenizer(tokenizer, out / "tokenizer")
        start = time.perf_counter()
        validate = _validation(model, tokenizer, splits["validation"], cfg.max_new_tokens)
        collate = collate_fn(tokenizer, examples, max_length=model.config.max_position_embeddings)
        train(
            Distiller(model),
            collate,
            len(examples),
            cfg.train,
            out,
            progress=progress,
            validate=validate,
            fingerprint={"teacher": params, "examples": split_sha256(examples)},
        )
        seconds = time.perf_counter() - start
    metrics = evaluate(model, tokenizer, splits["test"], out / "test_predictions.jsonl", cfg.max_new_tokens)
    metrics |= {"train_seconds": round(seconds, 1), "parameters": sum(p.numel() for p in model.parameters())}
    metrics |= {"kv_spec": vars(kv_spec(model.config)), "model_type": model.config.model_type}
    metrics |= {"vocab_size": len(tokenizer)}
    write_json(out / "metrics.json", metrics)
    return metrics


def extract_teacher_kv(
    teacher_dir: str | Path, data_dir: str | Path, out_dir: str | Path, budget: int | None = None, **options
) -> KVStore:
    """The teacher's KV over the student-training split (pre-RoPE keys, fp16), optionally compressed."""
    model, tokenizer = load_trained(teacher_dir, inference=True)
    examples = load_splits(data_dir)["student_train"]
    meta = {"teacher": str(teacher_dir), "model_type": model.config.model_type}
    return extract_store(model, tokenizer, examples, out_dir, budget=budget, meta=meta, **options)


def evaluate_student(student_dir: str | Path, data_dir: str | Path, max_new_tokens: int, out_path) -> dict:
    """Greedy decoding of a trained student on the test split; one record per example written to ``out_path``."""
    model, tokenizer = load_trained(student_dir, inference=True)
    return evaluate(model, tokenizer, load_splits(data_dir)["test"], out_path, max_new_tokens)


def train_student(
    params: dict,
    group: dict,
    seed: int,
    data_dir: str | Path,
    out_dir: str | Path,
    kv_root: str | Path | None = None,
    alignment_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train one student (one group, one seed) on the student-training split; returns the training summary.

    ``group``: ``teachers`` (names of stores under ``kv_root``; none = CE only), ``kv`` (KVConfig) and,
    for several teachers, ``fusion`` (FusionConfig). A ``cka`` layer map reads the teacher x student CKA
    matrices the alignment stage wrote to ``alignment_dir/cka_<teacher>.json``.
    """
    g = GroupConfig.from_params(group)
    cfg = ModelConfig.from_params(params)
    if cfg.train is None:
        raise ValueError("a student needs a train section")
    train_cfg = from_dict(type(cfg.train), {**vars(cfg.train), "seed": seed})
    out = Path(out_dir)
    splits = load_splits(data_dir)
    examples = splits["student_train"]
    model, tokenizer = _build(cfg, [e.text for e in examples], seed)  # the same on every process
    spec_s = kv_spec(model.config)
    if g.teachers and kv_root is None:
        raise ValueError(
            f"the group names teachers {g.teachers} but no kv_root was given; pass the teacher_kv stores' folder"
        )
    examples_sha = split_sha256(examples)
    stores, aligners = [], []
    for name in g.teachers:
        directory = Path(kv_root) / name
        if not directory.exists():
            found = sorted(p.parent.name for p in Path(kv_root).glob("*/manifest.json"))
            raise ValueError(
                f"the group names teacher {name!r} but no KV store exists at {directory} (stores there: {found}); "
                f"{name!r} must be a teacher of the study (teacher.teachers and study.teachers in the params) whose "
                "teacher_kv stage has run"
            )
        store = KVStore(directory)
        if store.meta.get("examples_sha256") != examples_sha:
            raise ValueError(
                f"the KV store of teacher {name} was extracted over other examples (sha256 "
                f"{store.meta.get('examples_sha256', 'not recorded')}) than the student-training split (sha256 "
                f"{examples_sha}); re-run the teacher_kv stage for {name}"
            )
        stores.append(store)
        if g.kv.pre_rope != store.meta["pre_rope"]:
            raise ValueError(
                f"kv.pre_rope={g.kv.pre_rope} but the store of teacher {name} holds "
                f"{'pre' if store.meta['pre_rope'] else 'post'}-RoPE keys; extract it with pre_rope={g.kv.pre_rope}"
            )
        cka = None
        if g.kv.layer_map == "cka":
            if alignment_dir is None:
                raise ValueError("layer_map 'cka' needs the alignment stage's CKA matrices: pass alignment_dir")
            matrices = json.loads((Path(alignment_dir) / f"cka_{name}.json").read_text())
            cka = torch.tensor(matrices["keys"]) + torch.tensor(matrices["values"])
        lmap = layer_map(store.spec.num_layers, spec_s.num_layers, g.kv.layer_map, cka=cka)
        aligners.append(TeacherAligner(store.spec, spec_s, lmap, g.kv.projector, g.kv.time_align, g.kv.shuffle_time))
    fusion = None
    if g.fusion is not None:
        fusion = make_fusion(
            g.fusion.kind,
            len(stores),
            spec_s.num_layers,
            model.config.hidden_size,
            len(TASKS),
            g.fusion.weights,
            g.fusion.temperature,
            g.fusion.entropy_weight,
        )
    distiller = Distiller(model, aligners, g.kv, fusion)
    start = time.perf_counter()
    validate = _validation(model, tokenizer, splits["validation"], cfg.max_new_tokens)
    collate = collate_fn(tokenizer, examples, stores, max_length=model.config.max_position_embeddings)
    manifests = [hashlib.sha256((s.directory / "manifest.json").read_bytes()).hexdigest() for s in stores]
    summary = train(
        distiller,
        collate,
        len(examples),
        train_cfg,
        out,
        progress=progress,
        validate=validate,
        fingerprint={"student": params, "group": group, "seed": seed, "examples": examples_sha, "stores": manifests},
    )
    summary |= {"train_seconds": round(time.perf_counter() - start, 1), "seed": seed, "teachers": g.teachers}
    if PartialState().is_main_process:  # set up by the training loop; under a launcher only the main process writes
        save_tokenizer(tokenizer, out / "tokenizer")
        write_json(out / "summary.json", summary)
    return summary
