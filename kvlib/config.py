"""Frozen, self-validating configs for models, training and KV distillation, built from params sections.

``from_dict`` rejects unknown keys with the list of valid ones (an airtight config: every key is
used); ``__post_init__`` checks ranges and choices. Model facts (KV heads, head dims) are never
configured here: they are read from each model's config by ``kvlib.hf.kv_spec``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvlib.fusion import KINDS as FUSIONS
from kvlib.layers import KINDS as LAYER_MAPS
from kvlib.losses import KINDS as KV_LOSSES
from kvlib.models import FAMILIES, build_model, model_config
from kvlib.projectors import KINDS as PROJECTORS
from kvlib.resample import ALIGNMENTS


def from_dict(cls, values: dict):
    """Build dataclass ``cls`` from a params mapping, rejecting keys it does not have."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {names}")
    return cls(**values)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _positive(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"{name} must be > 0, got {getattr(obj, name)}")


@dataclass(frozen=True)
class ModelShape:
    """A tiny model of a real Hugging Face family, built from config."""

    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    def __post_init__(self):
        _choice("family", self.family, FAMILIES)
        _positive(self, "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size")

    def build(self, vocab_size: int, seed: int, max_positions: int = 512):
        shape = dataclasses.asdict(self)
        return build_model(model_config(vocab_size=vocab_size, max_positions=max_positions, **shape), seed)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: AdamW with linear warm-up and cosine decay, for a fixed number of optimizer steps."""

    steps: int = 200
    batch_size: int = 16  # examples per micro-batch and process
    grad_accum: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 10  # progress-bar and metrics-file interval (optimizer steps)
    save_every: int = 100  # checkpoint interval (optimizer steps)
    share_every: int = 50  # gradient-share measurement interval (optimizer steps); 0 = never
    eval_every: int = 0  # validation-accuracy interval (optimizer steps); 0 = never
    mixed_precision: str = "auto"  # "auto" = bf16 on GPU, none on CPU; or "no" / "bf16" / "fp16"

    def __post_init__(self):
        _positive(self, "steps", "batch_size", "grad_accum", "lr", "max_grad_norm", "log_every", "save_every")
        if min(self.warmup_steps, self.share_every, self.eval_every, self.weight_decay) < 0:
            raise ValueError(
                f"warmup_steps={self.warmup_steps}, share_every={self.share_every}, eval_every={self.eval_every} "
                f"and weight_decay={self.weight_decay} must be >= 0"
            )
        _choice("mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))


@dataclass(frozen=True)
class KVConfig:
    """How teacher KV is aligned to the student and weighed against CE."""

    weight: float = 1.0  # weight of the KV loss in the total loss (CE has weight 1)
    loss: str = "mse"
    k_weight: float = 1.0
    v_weight: float = 1.0
    normalize: bool = True  # divide by the target's per-layer std
    pre_rope: bool = True  # match keys before RoPE (un-rotate the student's; the store holds pre-RoPE teacher keys)
    time_align: str = "span"
    layer_map: str = "uniform"
    projector: str = "linear"
    relation_weight: float = 0.0  # weight of the MiniLMv2 relation loss (0 = off)
    relation_heads: int = 1
    shuffle_time: bool = False  # negative control: teacher KV shuffled in time within each example

    def __post_init__(self):
        _choice("loss", self.loss, KV_LOSSES)
        _choice("time_align", self.time_align, ALIGNMENTS)
        _choice("layer_map", self.layer_map, LAYER_MAPS)
        _choice("projector", self.projector, PROJECTORS)
        _positive(self, "relation_heads")
        if min(self.weight, self.k_weight, self.v_weight, self.relation_weight) < 0:
            raise ValueError(
                f"weights must be >= 0, got weight={self.weight}, k_weight={self.k_weight}, "
                f"v_weight={self.v_weight}, relation_weight={self.relation_weight}"
            )


@dataclass(frozen=True)
class TokenizerConfig:
    """A tokenizer trained on the training texts: ``char`` (vocab_size None) or byte-level ``bpe``."""

    kind: str = "bpe"
    vocab_size: int | None = 384

    def __post_init__(self):
        _choice("tokenizer kind", self.kind, ("char", "bpe"))


@dataclass(frozen=True)
class ModelConfig:
    """A model: built from ``shape`` with a tokenizer trained as ``tokenizer`` says, or loaded with its own
    tokenizer from a local checkpoint directory ``path``; trained as ``train`` says (``None``: a checkpoint
    used as it is, e.g. a pretrained teacher), decoded greedily for at most ``max_new_tokens``."""

    train: TrainConfig | None = None
    shape: ModelShape | None = None
    tokenizer: TokenizerConfig | None = None
    path: str = ""
    max_new_tokens: int = 96

    def __post_init__(self):
        built = self.shape is not None and self.tokenizer is not None
        if built == bool(self.path) or (self.path and (self.shape or self.tokenizer)):
            raise ValueError(
                "give a model either a shape and a tokenizer (built from config) or a checkpoint path, not both; "
                f"got shape={self.shape}, tokenizer={self.tokenizer}, path={self.path!r}"
            )
        if built and self.train is None:
            raise ValueError("a model built from a shape needs a train section")
        _positive(self, "max_new_tokens")

    @classmethod
    def from_params(cls, params: dict) -> ModelConfig:
        values = dict(params)
        for key, sub in (("shape", ModelShape), ("tokenizer", TokenizerConfig), ("train", TrainConfig)):
            if values.get(key) is not None:
                values[key] = from_dict(sub, values[key])
        return from_dict(cls, values)


@dataclass(frozen=True)
class FusionConfig:
    """How several teachers' aligned KV are combined per layer (see ``kvlib.fusion``)."""

    kind: str = "fixed"
    weights: list[float] | None = None  # fixed weights, one per teacher (default uniform)
    temperature: float = 1.0
    entropy_weight: float = 0.0  # router only: > 0 pushes toward specialised, < 0 toward diverse

    def __post_init__(self):
        _choice("fusion kind", self.kind, FUSIONS)
        _positive(self, "temperature")


@dataclass(frozen=True)
class GroupConfig:
    """One experiment group: which teachers (none = CE only), how their KV is used, how they are fused."""

    teachers: list[str]
    kv: KVConfig | None = None
    fusion: FusionConfig | None = None

    def __post_init__(self):
        if bool(self.teachers) != (self.kv is not None):
            raise ValueError(f"a group with teachers {self.teachers} needs kv settings, and a group without none")
        if len(self.teachers) > 1 and self.fusion is None:
            raise ValueError(f"a group with teachers {self.teachers} needs fusion settings")
        if len(set(self.teachers)) != len(self.teachers):
            raise ValueError(f"teachers {self.teachers} are listed twice")

    @classmethod
    def from_params(cls, params: dict) -> GroupConfig:
        values = dict(params)
        if values.get("kv") is not None:
            values["kv"] = from_dict(KVConfig, values["kv"])
        if values.get("fusion") is not None:
            values["fusion"] = from_dict(FusionConfig, values["fusion"])
        return from_dict(cls, values)
