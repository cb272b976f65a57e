"""The latent stage: train one arm of the latent study (one seed), then score it on the test split with the
forward passes each answer took.

An arm (``LatentArm``, an entry of ``latent.arms`` in the params) is one of three modes:

- ``cot``: CE on the question, the written chain of thought and the answer (CoT-SFT, the upper bound); at test
  time it writes its chain again before the answer;
- ``nocot``: CE on the question and the answer alone, the chain removed (the lower bound);
- ``latent``: a ``kvlib.latent.LatentStudent`` with ``num_thoughts`` continuous thoughts, trained by
  ``LatentDistiller`` on the answer CE plus the ``weights`` of ``teacher_ce`` (the same network in teacher mode
  on the chain and the answer), ``codi`` and ``kv``. The KV targets are the chain's KV compressed to the M
  thought slots by ``rule`` (``rkv`` or ``crop``): the student's own teacher mode (self-distillation, as KaVa),
  or, with ``teachers``, trained teachers of other families (by name under ``teacher_root``) read through a
  ``SlotAligner`` each (``layer_map``, ``projector``) and, for several, fused (``fusion``).

Every arm trains the same student (shape, tokenizer, ``train`` settings) for the same steps on the first
``train_examples`` problems of ``split``; the tokenizer is trained on the fixed ``tokenizer.corpus`` split. A
test record per example holds ``correct`` and ``forward_passes`` (chain of thought: one per generated token,
the prompt's pass giving the first; latent: the prompt, the thoughts, the end marker and one per answer token
after the first, as ``LatentStudent.generate`` counts them). ``run_arm`` trains an arm's seeds in ``workers``
processes side by side (``kvlib.processes``).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from kvlib.batches import collate_fn
from kvlib.checkpoints import build, load_trained, tokenizer_corpus
from kvlib.config import ModelConfig, check_choice, from_dict
from kvlib.data import TASKS, Example, load_splits, split_sha256
from kvlib.distill import Distiller, FusionConfig
from kvlib.evaluate import generate, validation
from kvlib.files import write_json, write_text
from kvlib.fusion import make_fusion
from kvlib.hf import kv_spec
from kvlib.latent import (
    RULES,
    LatentDistiller,
    LatentStudent,
    SlotAligner,
    evaluate_latent,
    latent_batch,
    load_latent,
    scored,
)
from kvlib.layers import layer_map
from kvlib.processes import side_by_side
from kvlib.slot_table import SlotTable
from kvlib.text import check_lengths, load_tokenizer, save_tokenizer
from kvlib.train import train

MODES = ("cot", "nocot", "latent")
TERMS = ("teacher_ce", "codi", "kv")


@dataclass(frozen=True)
class LatentArm:
    """One arm of the latent study (see the module docstring); ``weights``: term -> weight (CE has weight 1)."""

    mode: str
    weights: dict = field(default_factory=dict)
    rule: str = "rkv"
    loss: str = "l1"  # the KV term's distance: l1, mse or smooth_l1 (kvlib.latent.thought_kv_loss)
    teachers: list = field(default_factory=list)
    layer_map: str = "uniform"
    projector: str = "linear"
    fusion: FusionConfig | None = None

    def __post_init__(self):
        check_choice("latent arm mode", self.mode, MODES)
        check_choice("latent arm rule", self.rule, RULES)
        unknown = sorted(set(self.weights) - set(TERMS))
        if unknown or any(not isinstance(w, (int, float)) or w < 0 for w in self.weights.values()):
            raise ValueError(f"latent arm weights are terms {TERMS} -> a number >= 0, got {self.weights}")
        if self.mode != "latent" and (self.weights or self.teachers):
            raise ValueError(
                f"a {self.mode!r} arm is trained by CE alone; weights {self.weights} and teachers {self.teachers} "
                "belong to mode 'latent'"
            )
        if self.teachers and not self.weights.get("kv"):
            raise ValueError(f"teachers {self.teachers} supervise only the KV term: give weights.kv > 0")
        if (len(self.teachers) > 1) != (self.fusion is not None):
            raise ValueError(f"teachers {self.teachers}: give fusion settings exactly when there are several")
        if len(set(self.teachers)) != len(self.teachers):
            raise ValueError(f"teachers {self.teachers} are listed twice")
        if self.fusion is not None and self.fusion.entropy_weight:
            raise ValueError(
                f"fusion.entropy_weight={self.fusion.entropy_weight}: LatentDistiller has no router entropy term, so "
                "the weight would be ignored; set it to 0 (or leave it out)"
            )

    @classmethod
    def from_params(cls, params: dict) -> LatentArm:
        return from_dict(cls, params)


def without_chain(examples: list[Example]) -> list[Example]:
    """The examples with their chain of thought removed (the No-CoT arm's training text)."""
    return [replace(e, reasoning="") for e in examples]


def training_examples(splits: dict, split: str, train_examples: int = 0) -> list[Example]:
    """The first ``train_examples`` (0: all) problems of ``split``, the ones an arm trains on."""
    if split not in splits:
        raise ValueError(f"latent split {split!r} is not one of the data splits {sorted(splits)}")
    if train_examples > len(splits[split]):
        raise ValueError(
            f"train_examples={train_examples} but split {split!r} has {len(splits[split])}; lower it or raise "
            f"data.sizes.{split}"
        )
    return splits[split][: train_examples or None]


def teacher_tables(arm: LatentArm, teacher_root, examples: list[Example], num_thoughts: int, slots_dir) -> list:
    """Per teacher of the arm, its slot table over ``examples`` (``kvlib.slot_table.SlotTable``, kept in
    ``slots_dir/<teacher>.safetensors``: read when computed from the same inputs, else computed there) and its
    ``KVSpec``."""
    if arm.teachers and teacher_root is None:
        raise ValueError(f"the arm names teachers {arm.teachers}: pass teacher_root, the teacher stage's folder")
    tables = []
    for name in arm.teachers:
        teacher, tokenizer = load_trained(Path(teacher_root) / name, inference=True)  # on a GPU in bf16 if there is one
        path = Path(slots_dir) / f"{name}.safetensors"
        table = SlotTable.build(path, teacher.eval(), tokenizer, examples, num_thoughts, arm.rule)
        tables.append((table, kv_spec(teacher.config)))
    return tables


def _fusion(arm: LatentArm, model):
    if arm.fusion is None:
        return None
    f = arm.fusion
    spec_s = kv_spec(model.config)
    return make_fusion(
        f.kind, len(arm.teachers), spec_s.num_layers, model.config.hidden_size, len(TASKS), f.weights, f.temperature
    )


def train_latent(
    params: dict,
    arm: dict,
    seed: int,
    data_dir: str | Path,
    out_dir: str | Path,
    num_thoughts: int,
    passes: int = 0,
    split: str = "teacher_train",
    train_examples: int = 0,
    teacher_root: str | Path | None = None,
    slots_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train one arm (``arm``: a ``LatentArm`` mapping) with seed ``seed`` on the first ``train_examples`` (0: all)
    problems of ``split``; returns the training summary. ``params``: the student (``ModelConfig``: shape,
    tokenizer with its fixed ``corpus``, ``train``, ``max_new_tokens``); ``num_thoughts``/``passes``: the latent
    student's M and Jacobi passes (0: sequential); ``slots_dir``: where the teachers' slot tables are kept
    (``teacher_tables``; default ``out_dir/teacher_slots``)."""
    a = LatentArm.from_params(arm)
    cfg = ModelConfig.from_params(params)
    if cfg.train is None:
        raise ValueError("a latent student needs a train section")
    splits = load_splits(data_dir)
    examples = training_examples(splits, split, train_examples)
    model, tokenizer = build(cfg, tokenizer_corpus(cfg, splits, split), seed)
    train_cfg = from_dict(type(cfg.train), {**vars(cfg.train), "seed": seed})
    validating = splits["validation"]
    if a.mode == "latent":
        torch.manual_seed(seed)  # the projection and the markers, like the model, from the run's seed
        latent = LatentStudent(model, num_thoughts, passes)
        tables = teacher_tables(a, teacher_root, examples, num_thoughts, slots_dir or Path(out_dir) / "teacher_slots")
        spec_s = kv_spec(model.config)
        aligners = [
            SlotAligner(spec, spec_s, layer_map(spec.num_layers, spec_s.num_layers, a.layer_map), a.projector)
            for _, spec in tables
        ]
        teachers = [table for table, _ in tables]
        distiller = LatentDistiller(latent, a.weights, a.rule, a.loss, teachers, aligners, _fusion(a, model))

        def collate(idx):
            return latent_batch(tokenizer, [examples[i] for i in idx], list(idx))

        def validate():
            return {"accuracy": evaluate_latent(latent, tokenizer, validating, cfg.max_new_tokens)[1]["accuracy"]}

    else:
        distiller = Distiller(model)
        texts = examples if a.mode == "cot" else without_chain(examples)
        collate = collate_fn(tokenizer, texts, max_length=model.config.max_position_embeddings)
        validate = validation(model, tokenizer, validating, cfg.max_new_tokens)
    start = time.perf_counter()
    summary = train(
        distiller,
        collate,
        len(examples),
        train_cfg,
        out_dir,
        progress=progress,
        validate=validate,
        fingerprint={"student": params, "arm": arm, "seed": seed, "thoughts": [num_thoughts, passes]}
        | {"examples": split_sha256(examples)},
    )
    summary |= {"train_seconds": round(time.perf_counter() - start, 1), "seed": seed, "arm": arm}
    save_tokenizer(tokenizer, Path(out_dir) / "tokenizer")
    write_json(Path(out_dir) / "summary.json", summary)
    return summary


def evaluate_arm(run_dir: str | Path, mode: str, examples: list[Example], max_new_tokens: int) -> tuple[list, dict]:
    """Greedy answers of a trained arm (``run_dir``: what ``train_latent`` left) on ``examples``: one record per
    example (``correct``, ``forward_passes``, ...) and the accuracy with the mean forward passes per answer."""
    check_choice("latent arm mode", mode, MODES)
    run = Path(run_dir)
    if mode == "latent":
        latent = load_latent(run / "model").to("cuda" if torch.cuda.is_available() else "cpu")
        return evaluate_latent(latent, load_tokenizer(run / "tokenizer"), examples, max_new_tokens)
    model, tokenizer = load_trained(run, inference=True)
    prompts, limit = [e.prompt for e in examples], model.config.max_position_embeddings
    check_lengths(tokenizer, prompts, [e.id for e in examples], limit, reserve=max_new_tokens, add_eos=False)
    return scored(examples, *generate(model, tokenizer, prompts, max_new_tokens, lengths=True))


def write_records(path: str | Path, records: list[dict], arm: str, seed: int) -> None:
    """The test records of one run, keyed by ``group`` (the arm) and ``seed`` as ``kvlib.contrasts`` reads them."""
    write_text(path, "".join(json.dumps({"group": arm, "seed": seed} | r) + "\n" for r in records))


def run_seed(
    params: dict,
    name: str,
    arm: dict,
    seed: int,
    settings: dict,
    data_dir,
    teacher_root,
    slots_dir,
    run_dir,
    report_dir,
    threads: int,
) -> dict:
    """Train and score one seed of arm ``name``: ``train_latent`` with ``settings`` (its keyword arguments
    ``num_thoughts``, ``passes``, ``split``, ``train_examples``) into ``run_dir``, then ``evaluate_arm`` on the test
    split, its records to ``run_dir/predictions.jsonl``; the summary and learning curve to ``report_dir``."""
    torch.set_num_threads(threads)
    run, report = Path(run_dir), Path(report_dir)
    summary = train_latent(
        params, arm, seed, data_dir, run, teacher_root=teacher_root, slots_dir=slots_dir, progress=False, **settings
    )
    test = load_splits(data_dir)["test"]
    records, scores = evaluate_arm(run, arm["mode"], test, ModelConfig.from_params(params).max_new_tokens)
    write_records(run / "predictions.jsonl", records, name, seed)
    summary |= {"test": scores, "mode": arm["mode"]} | settings
    write_json(report / "summary.json", summary)
    shutil.copy(run / "metrics.jsonl", report / "learning_curve.jsonl")
    return summary


def run_arm(seeds: list[int], workers: int, run_root, report_root, **kwargs) -> dict[int, dict]:
    """``run_seed`` for each of ``seeds`` (into ``run_root/<seed>`` and ``report_root/<seed>``), ``workers`` at a
    time in processes of their own (1: one after another in this process); seed -> summary. A failed seed raises
    once every started seed has ended. The teachers' slot tables (``teacher_tables``) are computed first, once, in
    this process (torch's own thread count), into ``run_root/teacher_slots``, where every seed reads them."""
    slots_dir = Path(run_root) / "teacher_slots"
    arm, settings = LatentArm.from_params(kwargs["arm"]), kwargs["settings"]
    if arm.teachers:
        examples = training_examples(load_splits(kwargs["data_dir"]), settings["split"], settings["train_examples"])
        teacher_tables(arm, kwargs["teacher_root"], examples, settings["num_thoughts"], slots_dir)
    kwargs |= {"slots_dir": slots_dir}
    jobs = {
        s: kwargs | {"seed": s, "run_dir": Path(run_root) / str(s), "report_dir": Path(report_root) / str(s)}
        for s in seeds
    }
    return side_by_side(run_seed, jobs, workers)
