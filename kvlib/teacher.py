"""The teacher stage: train one teacher with CE on the teacher-training split (or take a checkpoint as it is).

A teacher built from a shape gets a tokenizer trained on its training texts, is trained on prompt +
reasoning + answer (``kvlib.objective.CausalLM``), saved (``model/`` and ``tokenizer/`` apart, see the
tokenizer trap in REFERENCE.md) and evaluated greedily on the test split; a teacher without a ``train``
section (a local checkpoint ``path``) is used as it is, recorded in ``checkpoint.json``. Its results
depend on no KV alignment or distillation code, so changing those does not retrain the teachers.
"""

from __future__ import annotations

import time
from pathlib import Path

from kvlib.batches import collate_fn
from kvlib.checkpoints import build, load_trained, tokenizer_corpus
from kvlib.config import ModelConfig
from kvlib.data import load_splits, split_sha256
from kvlib.evaluate import evaluate, validation
from kvlib.files import write_json
from kvlib.hf import kv_spec
from kvlib.objective import CausalLM
from kvlib.text import save_tokenizer
from kvlib.train import train


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
        model, tokenizer = build(cfg, tokenizer_corpus(cfg, splits, "teacher_train"), cfg.train.seed)
        kv_spec(model.config)
        save_tokenizer(tokenizer, out / "tokenizer")
        start = time.perf_counter()
        validate = validation(model, tokenizer, splits["validation"], cfg.max_new_tokens)
        collate = collate_fn(tokenizer, examples, max_length=model.config.max_position_embeddings)
        train(
            CausalLM(model),
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
