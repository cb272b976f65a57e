"""Frozen, self-validating configs for models, training and KV distillation, built from params sections,
and the loading and cross-checking of the params files themselves.

``from_dict`` rejects unknown keys with the list of valid ones (an airtight config: every key is
used), builds nested configs from nested mappings, and checks every given value against its field's
annotation (``check_type``): an ``int`` field takes integers but not booleans, a ``float`` field finite
integers or floats, a ``bool`` field only ``true``/``false`` (YAML's ``'no'`` is a string), a ``list[str]``
a list (``AB`` is not ``[A, B]``); the error names the config, the key, the value and the type wanted.
``__post_init__`` then checks ranges and choices. Model facts (KV heads, head dims) are never
configured here: they are read from each model's config by ``kvlib.hf.kv_spec``.

``load_params`` reads a params file as YAML 1.1 with one change: a number in exponent notation that
YAML 1.1 reads as a string (``3e-4``, ``1E5``: no dot; ``1.5e5``: no sign after the ``e``) is the float
it means. The file must be a mapping of sections (mappings) plus the top-level ``OPTIONS`` (booleans).
``check_study`` checks the ``study`` section, which dvc.yaml's generated stages iterate over, against
the sections that must agree with it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from kvlib.models import FAMILIES, build_model, model_config

OPTIONS = ("allow_outside_project",)  # top-level booleans of a params file, not sections (see kvlib.runner)
STUDY_KEYS = ("teachers", "control", "groups", "seeds", "tuning", "secondary", "latent")
LATENT_KEYS = ("max_operand", "arms")  # study.latent: the latent study (kvlib.latent_student)
# a teacher or group name: it names folders, notebooks and DVC params paths (train.groups.<name>), where a
# "." would read as nesting, so none is allowed
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
NAMES = {bool: "a bool (true/false)", int: "an integer", float: "a finite number", str: "a string", dict: "a mapping"}
PLURALS = {int: "integers", float: "finite numbers", str: "strings"}  # the items of list[...] fields


class ParamsLoader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML's safe loader) that also reads ``3e-4``, ``1E5``, ``-2e-3``, ``1.5e5`` as floats."""


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str):
    """``text`` parsed by ``ParamsLoader``; a syntax error is a ValueError naming ``where`` and the line."""
    try:
        return yaml.load(text, ParamsLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{where} is not valid YAML; fix it there: {e}") from e


def load_params(path: str | Path) -> dict:
    """A params file: a mapping of sections, each a mapping, plus boolean ``OPTIONS``.

    Errors (ValueError) name the file and the line: a YAML syntax error, a file that is not a mapping, a
    key given twice (YAML keeps the last silently), a section that is not a mapping, an option that is not
    ``true``/``false``."""
    with open(path, encoding="utf-8") as stream:  # YAML's errors then name the file
        loader = ParamsLoader(stream)
        try:
            node = loader.get_single_node()
            params = None if node is None else loader.construct_document(node)
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML; fix it there: {e}") from e
        finally:
            loader.dispose()
    if not isinstance(params, dict):
        line = 1 if node is None else node.start_mark.line + 1
        raise ValueError(f"{path} line {line}: a params file is a mapping of sections (data:, train:, ...)")
    keys = [k.value for k, _ in node.value]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"{path} gives the top-level keys {twice} more than once; keep one of each")
    for (_, value_node), (name, value) in zip(node.value, params.items()):
        line = value_node.start_mark.line + 1
        if name in OPTIONS and not isinstance(value, bool):
            raise ValueError(f"{path} line {line}: option {name} must be true or false, got {value!r}")
        if name not in OPTIONS and not isinstance(value, dict):
            raise ValueError(
                f"{path} line {line}: section {name} must be a mapping of its parameters, got {value!r}; "
                f"top-level keys are sections or the options {sorted(OPTIONS)}"
            )
    return params


@functools.cache
def _field_hints(cls) -> dict:
    """Field name -> resolved annotation of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _options(hint) -> tuple:
    """The alternatives of a ``X | Y`` annotation, or ``(hint,)``."""
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def matches(value, hint) -> bool:
    """Whether ``value`` fits annotation ``hint``: an int is not a bool, a float is a finite int or float, a
    ``list[X]`` holds only X, ``X | None`` takes either; other classes (str, dict, a config) by isinstance."""
    if isinstance(hint, types.UnionType):
        return any(matches(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(matches(v, item) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    return isinstance(value, hint)


def describe(hint) -> str:
    """How an annotation reads in an error message: ``list[str] | None`` -> 'a list of strings or null'."""
    if isinstance(hint, types.UnionType):
        return " or ".join(describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {PLURALS[typing.get_args(hint)[0]]}"
    if hint is type(None):
        return "null"
    return NAMES.get(hint) or f"a {hint.__name__} (a mapping of its keys)"


def check_type(cls, name: str, value) -> None:
    """Raise TypeError unless ``value`` fits the annotation of field ``name`` of dataclass ``cls``."""
    hint = _field_hints(cls)[name]
    if not matches(value, hint):
        raise TypeError(
            f"{cls.__name__}.{name} must be {describe(hint)}, got {value!r} ({type(value).__name__}); "
            "write it so in the params file"
        )


def from_dict(cls, values: dict):
    """Build dataclass ``cls`` from a params mapping: unknown keys rejected, nested configs built from nested
    mappings, every given value checked against its field's annotation."""
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, dict):
        raise TypeError(f"{cls.__name__} must be a mapping of its keys {names}, got {values!r}")
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {names}")
    no_default = dataclasses.MISSING
    required = [f.name for f in dataclasses.fields(cls) if f.default is no_default and f.default_factory is no_default]
    missing = [n for n in required if n not in values]
    if missing:
        raise ValueError(f"{cls.__name__} needs the keys {missing}; got {sorted(values)}")
    built = {}
    for name, value in values.items():
        nested = [h for h in _options(_field_hints(cls)[name]) if dataclasses.is_dataclass(h)]
        built[name] = from_dict(nested[0], value) if nested and isinstance(value, dict) else value
        check_type(cls, name, built[name])
    return cls(**built)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_positive(obj, *names: str) -> None:
    """Refuse a config whose fields ``names`` are not > 0 (used by every config, ``kvlib.benchmark``'s too)."""
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
        check_choice("family", self.family, FAMILIES)
        check_positive(self, "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size")

    def build(self, vocab_size: int, seed: int, max_positions: int = 512):
        shape = dataclasses.asdict(self)
        return build_model(model_config(vocab_size=vocab_size, max_positions=max_positions, **shape), seed)


CLIPS = ("joint", "separate")


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
    clip: str = "joint"  # "joint": one norm over all terms; "separate": CE and the other terms clipped apart
    seed: int = 0
    log_every: int = 10  # progress-bar and metrics-file interval (optimizer steps)
    save_every: int = 100  # checkpoint interval (optimizer steps)
    share_every: int = 50  # gradient-share measurement interval (optimizer steps); 0 = never
    eval_every: int = 0  # validation-accuracy interval (optimizer steps); 0 = never
    mixed_precision: str = "auto"  # "auto" = bf16 on GPU, none on CPU; or "no" / "bf16" / "fp16"

    def __post_init__(self):
        check_positive(self, "steps", "batch_size", "grad_accum", "lr", "max_grad_norm", "log_every", "save_every")
        if min(self.warmup_steps, self.share_every, self.eval_every, self.weight_decay) < 0:
            raise ValueError(
                f"warmup_steps={self.warmup_steps}, share_every={self.share_every}, eval_every={self.eval_every} "
                f"and weight_decay={self.weight_decay} must be >= 0"
            )
        check_choice("mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))
        check_choice("clip", self.clip, CLIPS)
        if self.clip == "separate" and self.mixed_precision == "fp16":
            raise ValueError(
                "clip 'separate' takes the CE gradient apart from the loss scaler fp16 needs; use mixed_precision "
                "bf16 (or no), or clip 'joint'"
            )


@dataclass(frozen=True)
class TokenizerConfig:
    """A tokenizer trained on the training texts: ``char`` (vocab_size None) or byte-level ``bpe``. ``corpus``: the
    data split it is trained on ("": the model's own training split)."""

    kind: str = "bpe"
    vocab_size: int | None = 384
    corpus: str = ""

    def __post_init__(self):
        check_choice("tokenizer kind", self.kind, ("char", "bpe"))
        check_choice("tokenizer corpus", self.corpus, ("", "teacher_train", "student_train"))


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
        check_positive(self, "max_new_tokens")

    @classmethod
    def from_params(cls, params: dict) -> ModelConfig:
        return from_dict(cls, params)


def value_at(params: dict, path: str, needed_by: str = "the study needs"):
    """The value at dotted ``path`` of a params mapping (``"train.groups"``); a ValueError names the missing step,
    who needs it (``needed_by``) and the keys found there."""
    value, keys = params, path.split(".")
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            found = sorted(value) if isinstance(value, dict) else type(value).__name__
            where = ".".join(keys[:depth]) or "the params file"
            raise ValueError(f"{needed_by} {path}, but {where} has no {key!r} (found: {found}); add it or fix the path")
        value = value[key]
    return value


def _names(items, key: str, kind: str = "names", empty: bool = False) -> list:
    """A list of distinct names (or integers), non-empty unless ``empty``, else ValueError naming ``key``."""
    typed = isinstance(items, list) and all(
        isinstance(x, int) and not isinstance(x, bool) if kind == "integers" else isinstance(x, str) for x in items
    )
    if not typed or not (items or empty) or len(set(items)) != len(items):
        raise ValueError(f"{key} must be a {'' if empty else 'non-empty '}list of distinct {kind}, got {items!r}")
    return items


def _runs(study: dict, key: str) -> tuple[list, list]:
    """``study[key]``'s groups and seeds (``tuning``, ``secondary``: ``{groups, seeds}``; secondary may be empty)."""
    part = study[key]
    if not isinstance(part, dict) or sorted(part) != ["groups", "seeds"]:
        raise ValueError(f"study.{key} must be a mapping with exactly the keys groups and seeds, got {part!r}")
    empty = key == "secondary"
    groups = _names(part["groups"], f"study.{key}.groups", empty=empty)
    return groups, _names(part["seeds"], f"study.{key}.seeds", "integers", empty=empty)


def check_study(params: dict) -> None:
    """Check section ``study`` of a params mapping against the sections that must agree with it.

    ``study`` names what dvc.yaml's generated stages iterate over: ``teachers`` (a teacher and a KV
    extraction each), ``control`` and ``groups`` (the arms, a training run per seed each), ``seeds``,
    ``tuning`` (the candidates of ``kvlib.tuning``, trained on their own seeds and scored on validation) and
    ``secondary`` (exploratory arms on their own, fewer seeds; may be empty lists). Each list is non-empty and
    without repeats, seeds are integers, names are path-safe (``NAME``: they name folders, executed notebooks
    and DVC params paths, so no '.') and no group plays two roles; tuning seeds are not the arms' seeds (a
    choice is never made on runs that are compared). Every teacher and group must exist in
    ``teacher.teachers`` / ``train.groups``, every group may use only the study's teachers, ``tune`` must list
    exactly the tuning candidates and seeds, and every ``tuned`` arm a family of it; the evaluate, statistics
    and report sections must cover exactly the study's arms and seeds. A params file without ``study`` (one
    stage run by hand) has nothing to check. Raises ValueError naming the key and the fix.
    """
    if "study" not in params:
        return
    study = params["study"]
    if sorted(study) != sorted(STUDY_KEYS):
        raise ValueError(f"study must have exactly the keys {list(STUDY_KEYS)}, got {sorted(study)}")
    teachers, groups = _names(study["teachers"], "study.teachers"), _names(study["groups"], "study.groups")
    seeds, control = _names(study["seeds"], "study.seeds", "integers"), study["control"]
    candidates, tuning_seeds = _runs(study, "tuning")
    secondary, secondary_seeds = _runs(study, "secondary")
    unsafe = [
        n
        for n in [control, *groups, *teachers, *candidates, *secondary]
        if not (isinstance(n, str) and NAME.fullmatch(n))
    ]
    if unsafe:
        raise ValueError(
            f"study names {unsafe} must be letters, digits, '_' or '-', starting with a letter or digit; they name "
            "folders, notebooks and DVC params paths such as train.groups.<name>, which DVC reads as nested keys at "
            "each '.' ('Parameters ... are missing'); rename them, writing a decimal point as 'p' (S-w0p1, not S-w0.1)"
        )
    if control in groups:
        raise ValueError(f"study.control {control!r} is also in study.groups {groups}; remove it from the groups")
    roles = [control, *groups, *candidates, *secondary]
    twice = sorted({n for n in roles if roles.count(n) > 1})
    if twice:
        raise ValueError(
            f"groups {twice} play two roles in the study (arm, tuning candidate, secondary); give each one"
        )
    reused = sorted(set(tuning_seeds) & (set(seeds) | set(secondary_seeds)))
    if reused:
        raise ValueError(
            f"tuning seeds {reused} are also seeds of compared runs; choose tuning seeds of their own (e.g. 100, 101)"
        )
    every = [control, *groups]
    for names, path in ((teachers, "teacher.teachers"), (roles, "train.groups")):
        absent = [n for n in names if n not in value_at(params, path)]
        if absent:
            raise ValueError(
                f"the study names {absent}, absent from {path} {sorted(value_at(params, path))}; add them there or "
                "remove them from the study"
            )
    train_groups = value_at(params, "train.groups")
    paths = [f"train.groups.{g}.teachers" for g in roles if "teachers" in train_groups[g]] + ["alignment.teachers"]
    for path in paths:
        extra = [t for t in value_at(params, path) if t not in teachers]
        if extra:
            raise ValueError(
                f"{path} names {extra}, but study.teachers is {teachers}: no KV is extracted for them; add them there"
            )
    families = value_at(params, "tune.families")
    listed = [n for names in families.values() for n in names]
    if listed != candidates or value_at(params, "tune.seeds") != tuning_seeds:
        raise ValueError(
            f"tune.families list {listed} on seeds {value_at(params, 'tune.seeds')}, but study.tuning has {candidates} "
            f"on seeds {tuning_seeds}; list the same candidates, family by family, and the same seeds"
        )
    for g in roles:
        family = train_groups[g].get("tuned")
        if family is not None and (g in candidates or family not in families):
            where = (
                "a tuning candidate cannot be tuned itself"
                if g in candidates
                else f"tune.families has {sorted(families)}"
            )
            raise ValueError(f"train.groups.{g} is tuned by family {family!r}, but {where}")
    expected = {
        "evaluate.groups": every,
        "evaluate.seeds": seeds,
        "report.plan.groups": [*every, *secondary],  # a mapping group -> description: its keys
        "report.plan.seeds": len(seeds),
    }
    if secondary:
        expected["evaluate.secondary"] = {"groups": secondary, "seeds": secondary_seeds}
    elif value_at(params, "evaluate").get("secondary", {"groups": [], "seeds": []}) != {"groups": [], "seeds": []}:
        raise ValueError(
            "evaluate.secondary names runs but the study has no secondary; remove it or add study.secondary"
        )
    for path, want in expected.items():
        got = value_at(params, path)
        if (list(got) if isinstance(got, dict) and path.startswith("report") else got) != want:
            raise ValueError(
                f"{path} is {got!r} but the study makes it {want!r} (study.control, then study.groups, then "
                "study.secondary; report.plan.seeds counts study.seeds); set it so"
            )
    compared = set(every) | set(secondary)
    for kind in ("primary", "exploratory"):
        stats = value_at(params, "statistics")
        contrasts = value_at(params, "statistics.primary") if kind == "primary" else stats.get(kind, {})
        bad = {
            k: v
            for k, v in contrasts.items()
            if not (isinstance(v, list) and len(v) == 2 and set(v) <= compared and v[0] != v[1])
        }
        if bad:
            raise ValueError(
                f"statistics.{kind} contrasts {bad} must each name two different groups of the study (arms or "
                f"secondary: {sorted(compared)}) as [a, b] for a - b"
            )
    if not 1 <= len(value_at(params, "statistics.primary")) <= 4:
        raise ValueError(
            f"statistics.primary has {len(value_at(params, 'statistics.primary'))} contrasts; pre-register one to four "
            "(Holm corrects over them), the rest are exploratory"
        )
    check_latent_study(params)


def check_latent_study(params: dict) -> None:
    """``study.latent`` (``LATENT_KEYS``: the latent data's ``max_operand`` and the ``arms``, a stage each) against
    ``latent.arms`` and ``latent.runs`` (arm -> seeds), ``statistics.latent`` and ``report.latent_plan``: names
    path-safe, every arm defined, its teachers the study's, the statistics' runs exactly the stage's and their
    contrasts (one to four primary) between its arms, the plan describing exactly its arms."""
    study = params["study"]["latent"]
    if not isinstance(study, dict) or sorted(study) != sorted(LATENT_KEYS):
        raise ValueError(f"study.latent must have exactly the keys {list(LATENT_KEYS)}, got {study!r}")
    if not isinstance(study["max_operand"], int) or study["max_operand"] < 2:
        raise ValueError(f"study.latent.max_operand must be an integer >= 2, got {study['max_operand']!r}")
    arms = _names(study["arms"], "study.latent.arms")
    unsafe = [n for n in arms if not NAME.fullmatch(n)]
    if unsafe:
        raise ValueError(
            f"study.latent arms {unsafe} must be letters, digits, '_' or '-' (they name folders, notebooks and DVC "
            "params paths); rename them"
        )
    for path in ("latent.arms", "latent.runs"):
        absent = [n for n in arms if n not in value_at(params, path)]
        if absent:
            raise ValueError(f"study.latent names arms {absent}, absent from {path}; add them there")
    runs = value_at(params, "latent.runs")
    for n in arms:
        _names(runs[n], f"latent.runs.{n}", "integers")
    teachers = value_at(params, "study.teachers")
    for n in arms:
        extra = [t for t in value_at(params, "latent.arms")[n].get("teachers", []) if t not in teachers]
        if extra:
            raise ValueError(
                f"latent.arms.{n} names teachers {extra}, but study.teachers is {teachers}; add them there"
            )
    stats = value_at(params, "statistics.latent")
    want = {n: runs[n] for n in arms}
    if stats.get("runs") != want:
        raise ValueError(
            f"statistics.latent.runs is {stats.get('runs')!r} but latent.runs makes it {want!r}; set it so"
        )
    for kind in ("primary", "exploratory"):
        bad = {
            k: v
            for k, v in stats.get(kind, {}).items()
            if not (isinstance(v, list) and len(v) == 2 and set(v) <= set(arms) and v[0] != v[1])
        }
        if bad:
            raise ValueError(
                f"statistics.latent.{kind} contrasts {bad} must each name two different arms of the latent study "
                f"({arms}) as [a, b] for a - b"
            )
    if not 1 <= len(stats.get("primary", {})) <= 4:
        raise ValueError("statistics.latent.primary must pre-register one to four contrasts (Holm corrects over them)")
    described = value_at(params, "report.latent_plan.arms")
    if sorted(described) != sorted(arms):
        raise ValueError(
            f"report.latent_plan.arms describes {sorted(described)} but the latent study runs {sorted(arms)}; "
            "describe exactly those"
        )
