"""The student stage: train one student (one group, one seed) with CE and, when its group names teachers,
the KV loss against their stores.

Each teacher's store must have been extracted over the student-training split (its recorded
``examples_sha256``) with the group's ``pre_rope``; its layers map onto the student's by the group's
``layer_map`` (``cka``: the alignment stage's teacher x student CKA matrices), and several teachers are
fused (``kvlib.fusion``). A group without teachers (the control) trains with CE only, through the same
``Distiller``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from accelerate import PartialState

from kvlib.batches import collate_fn
from kvlib.checkpoints import build, tokenizer_corpus
from kvlib.config import ModelConfig, from_dict
from kvlib.data import TASKS, load_splits, split_sha256
from kvlib.distill import Distiller, GroupConfig, TeacherAligner
from kvlib.evaluate import validation
from kvlib.files import write_json
from kvlib.fusion import make_fusion
from kvlib.hf import kv_spec
from kvlib.kvstore import KVStore
from kvlib.layers import layer_map
from kvlib.text import save_tokenizer
from kvlib.train import train


def train_student(
    params: dict,
    group: dict,
    seed: int,
    data_dir: str | Path,
    out_dir: str | Path,
    kv_root: str | Path | None = None,
    alignment_dir: str | Path | None = None,
    progress: bool = True,
    store_cache_bytes: int | None = None,
) -> dict:
    """Train one student (one group, one seed) on the student-training split; returns the training summary.

    ``group``: ``teachers`` (names of stores under ``kv_root``; none = CE only), ``kv`` (KVConfig) and,
    for several teachers, ``fusion`` (FusionConfig); ``lr`` and ``train_examples`` when set (``GroupConfig``).
    The tokenizer is trained on the split the student's ``tokenizer.corpus`` names (default: the
    student-training split), so that a fixed corpus keeps it the same whatever ``train_examples`` is.
    A ``cka`` layer map reads the teacher x student CKA
    matrices the alignment stage wrote to ``alignment_dir/cka_<teacher>.json``. ``store_cache_bytes`` bounds the
    bytes of shards each teacher's store keeps in memory (``KVStore``'s ``cache_bytes``; None: no bound).
    """
    g = GroupConfig.from_params(group)
    cfg = ModelConfig.from_params(params)
    if cfg.train is None:
        raise ValueError("a student needs a train section")
    train_cfg = from_dict(type(cfg.train), {**vars(cfg.train), "seed": seed} | ({"lr": g.lr} if g.lr else {}))
    out = Path(out_dir)
    splits = load_splits(data_dir)
    examples = splits["student_train"]
    used = g.train_examples or len(examples)
    if used > len(examples):
        raise ValueError(
            f"train_examples={used} but the student-training split has {len(examples)}; lower it or raise "
            "data.sizes.student_train"
        )
    model, tokenizer = build(cfg, tokenizer_corpus(cfg, splits, "student_train"), seed)  # the same on every process
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
        store = KVStore(directory, cache_bytes=store_cache_bytes)
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
    validate = validation(model, tokenizer, splits["validation"], cfg.max_new_tokens)
    collate = collate_fn(tokenizer, examples, stores, max_length=model.config.max_position_embeddings)
    manifests = [hashlib.sha256((s.directory / "manifest.json").read_bytes()).hexdigest() for s in stores]
    summary = train(
        distiller,
        collate,
        used,
        train_cfg,
        out,
        progress=progress,
        validate=validate,
        fingerprint={"student": params, "group": group, "seed": seed, "examples": examples_sha, "stores": manifests},
    )
    summary |= {"train_seconds": round(time.perf_counter() - start, 1), "seed": seed, "teachers": g.teachers}
    summary |= {"group": group}  # the settings it trained with (a tuned arm's, resolved)
    if PartialState().is_main_process:  # set up by the training loop; under a launcher only the main process writes
        save_tokenizer(tokenizer, out / "tokenizer")
        write_json(out / "summary.json", summary)
    return summary
