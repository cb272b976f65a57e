"""Models and tokenizers of a stage: built from a shape, loaded from a local checkpoint, or left by a stage.

``build`` gives a model and its tokenizer from a ``ModelConfig``: the checkpoint ``path`` with its own
tokenizer (checked to fit the embedding), or a model of ``shape`` with a tokenizer trained on the given
texts, which ``tokenizer_corpus`` picks: the split ``tokenizer.corpus`` names, else the model's own
training split. ``load_trained`` reads back what a teacher or student stage left in its folder: ``model/`` and
``tokenizer/``, or, for a checkpoint used as it is, the directory named in ``checkpoint.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kvlib.config import ModelConfig
from kvlib.models import check_vocabulary, load_model
from kvlib.text import load_tokenizer, train_tokenizer

SMOKE_HINT = (  # the notebooks' smoke defaults read build/smoke/, which a fresh clone lacks
    " (a notebook's smoke defaults read build/smoke/: build it first with "
    "`.venv/bin/python -m kvlib.runner pipeline --params params/smoke.yaml --workdir build/smoke`)"
)


def tokenizer_corpus(cfg: ModelConfig, splits: dict, default: str) -> list[str]:
    """The texts ``build`` trains ``cfg``'s tokenizer on: those of the split ``cfg.tokenizer.corpus`` names, else
    of ``default``, the model's own training split (also for a checkpoint, whose texts ``build`` ignores).
    ``splits``: split name -> examples (``kvlib.data.load_splits``)."""
    name = cfg.tokenizer.corpus if cfg.tokenizer is not None and cfg.tokenizer.corpus else default
    if name not in splits:
        raise ValueError(
            f"the tokenizer corpus {name!r} is not one of the data splits {sorted(splits)}; name one of them in "
            "tokenizer.corpus, or leave it empty for the model's own training split"
        )
    return [e.text for e in splits[name]]


def build(cfg: ModelConfig, texts: list[str], seed: int):
    """A model and its tokenizer: from the checkpoint ``cfg.path``, or built from ``cfg.shape`` with a
    tokenizer trained on ``texts``."""
    if cfg.path:
        model, tokenizer = load_model(cfg.path), load_tokenizer(cfg.path)  # trained by accelerate, which places it
        check_vocabulary(model, tokenizer)
        return model, tokenizer
    tokenizer = train_tokenizer(cfg.tokenizer.kind, texts, cfg.tokenizer.vocab_size)
    return cfg.shape.build(len(tokenizer), seed), tokenizer


def load_trained(model_dir: str | Path, inference: bool = False):
    """The model and tokenizer a teacher or student stage left in ``model_dir``: ``model/`` and ``tokenizer/``,
    or, for a checkpoint used as it is, the directory named in ``checkpoint.json``. For ``inference`` on a
    machine with a GPU the model is put there in bfloat16 (real checkpoints); on a CPU it stays float32."""
    model_dir = Path(model_dir)
    pointer = model_dir / "checkpoint.json"
    if not pointer.exists() and not (model_dir / "model").is_dir():
        raise ValueError(
            f"{model_dir.name} was not trained: no {model_dir / 'model'} (nor a checkpoint.json); run its train stage"
            f"{SMOKE_HINT if 'build/smoke' in model_dir.as_posix() else ''}"
        )
    if not pointer.exists() and not (model_dir / "tokenizer" / "tokenizer.json").is_file():
        raise ValueError(
            f"{model_dir} holds a model but no tokenizer/tokenizer.json: the stage that trained it was interrupted "
            "before it saved the tokenizer; run that stage again"
        )
    path = json.loads(pointer.read_text())["path"] if pointer.exists() else model_dir / "model"
    gpu = inference and torch.cuda.is_available()
    model = load_model(path, torch.bfloat16 if gpu else None)
    tokenizer = load_tokenizer(path if pointer.exists() else model_dir / "tokenizer")
    check_vocabulary(model, tokenizer)
    return (model.to("cuda") if gpu else model), tokenizer
