"""Speed and memory of KV distillation on real-sized models: six ratios, each measured side by side in one run.

1. ``kv_store_vs_ce``: one training step of KV distillation reading the teachers' KV stores vs one CE-only
   step of the same student on the same examples (target: at most 1.15);
2. ``online_vs_store``: that step with the teachers run online (``teacher_kv.online_batch``) vs from the stores;
3. ``alignment_share``: un-rotation + time resampling + layer map + projectors + fusion + loss, forward and
   backward (``Distiller.kv_terms`` on the student's detached cache), as a share of the store step (target:
   at most 0.10);
4. ``selection_speedup``: KaVa-rule slot selection as ``extract_store`` does it (``teacher_kv.kava_select``) vs
   ``kava_select_loop``, the same rule written token by token (target: at least 50), on the same teacher
   attention over reasoning traces of ``select_tokens`` tokens, with the share of identical selections;
5. ``store_bytes``: bytes per teacher token of each teacher's store in fp16, and with a compression budget, vs the
   same cache dense in fp32;
6. ``peak_memory``: peak memory of a KV-distillation step (store, online) vs a CE-only step, above what the
   models and optimizer state already hold;
7. ``growth``: how the part of 3. grows with the sequence: ``Distiller.kv_terms`` forward and backward on synthetic
   KV of the models' real shapes (``growth_layers`` layers, batch 1, ``growth_lengths`` student tokens, 5 teacher
   tokens per 4 student ones), its time and peak memory, for the sparse aligner (``TeacherAligner``, time taps)
   and for ``DenseAligner``, the dense reference (``time_alignment``'s (Ts, Tt) matrix and one einsum), which
   is skipped above ``growth_dense_max`` tokens (its memory grows as Ts Tt); the growth exponent of each is the
   least-squares slope of log(seconds) on log(T) (target for the sparse path: at most 1.1, linear);
8. ``kv_store_vs_ce_full_depth`` (with ``full_depth``): ratio 1 again with the student at its checkpoint's full
   depth (the teachers' stores as measured), on batches of ``full_depth_batch_size`` examples;
9. ``store_read``: MB/s of KV that ``KVStore.batch`` delivers (float32, padded, as the step gets it) reading all
   of a store in batches, opened afresh (verifying and loading every shard) and from its cache, vs MB/s of reading
   the shard files' raw bytes in the same run (all from the page cache: the stores were just written).

Which models: ``models: real_shapes`` builds the published configs of real checkpoints
(``kvlib.models.REAL_SHAPES``), each with its own BPE tokenizer trained on the generated problems, so time
alignment is real. ``models: study`` measures the study's own models, given in ``study_models`` as the params
file's ``teacher.teachers`` and ``train.student`` sections give them (the runner passes a notebook only its
own section, so the benchmarks section names them again; ``tests/test_benchmark.py`` checks that each shipped
params file agrees with its study sections and uses ``study`` wherever they name a checkpoint by ``path``). Of a
checkpoint only ``config.json`` and the tokenizer are read: the weights are random, of that exact shape, since
timing and memory do not depend on trained values. A model kvlib cannot distil (``kvlib.models``' refusals of
what is no decoder-only causal LM, ``kv_spec``'s, and with ``kv.pre_rope`` the RoPE families ``kvlib.rope``
cannot undo) and a study model built from a shape (no checkpoint: its timings would measure Python overhead,
not the KV path) are not measured: the results' ``models`` entry says why, the remaining teachers are
measured, and without a student or any teacher nothing is (``skipped``). Nothing falls back to real shapes.
Either way the layer counts are the params' (fewer than the real ones where CPU time or memory needs it).

A training step is what ``kvlib.train`` does per micro-batch: collate (encode; read the store or run the
teachers), move to the device, forward, backward, clip, AdamW step. Timed variants run interleaved, one
round after another after a warm-up round, each round starting with another variant; a ratio is the
median over rounds of the ratio within a round, so that a slow moment of a shared machine hits both
sides alike. On a GPU each timed region ends with a synchronize, the student trains under bf16
autocast (as ``accelerate`` mixed precision does) and the teachers run in bf16.
Peak memory on a GPU is torch's peak allocated bytes; on a CPU the peak resident set (Linux ``VmHWM``,
reset through ``/proc/self/clear_refs``) above the resident set before the step, measured after the
step timings with glibc's mmap threshold pinned at 64 KiB so that freed tensors go back to the system, and
before the growth and full-depth runs (which then run pinned), whose freed heap later steps would reuse unseen. The
growth benchmark measures that way too, with its inputs (teacher and student KV) already held: its peak is what
the alignment, fusion and loss allocate forward and backward.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import platform
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate.utils import send_to_device
from transformers import AutoConfig

from kvlib.batches import collate_fn
from kvlib.config import ModelConfig, check_choice, check_positive, from_dict
from kvlib.data import SEGMENTS, TASKS, generate
from kvlib.distill import Distiller, KVConfig, TeacherAligner
from kvlib.fusion import make_fusion
from kvlib.hf import KVSpec, decoder_config, extract_kv_and_attention, forward_with_kv, kv_spec
from kvlib.kvstore import KVStore
from kvlib.layers import layer_map
from kvlib.models import REAL_SHAPES, _check_causal_lm_config, build_model, check_vocabulary, real_config
from kvlib.progress import progress
from kvlib.resample import time_alignment
from kvlib.rope import rope_family, unrotate_keys
from kvlib.teacher_kv import extract_store, kava_select, online_batch
from kvlib.text import encode_batch, load_tokenizer, train_tokenizer

TARGETS = {"kv_store_vs_ce": ("<=", 1.15), "alignment_share": ("<=", 0.10), "selection_speedup": (">=", 50.0)}
TARGETS |= {"kv_store_vs_ce_full_depth": ("<=", 1.10), "growth_exponent_sparse": ("<=", 1.1)}
MODELS = ("real_shapes", "study")
WEIGHTS = (
    "random, of each model's exact shape (of a checkpoint only config.json and the tokenizer are read): "
    "timing and memory need no trained weights"
)


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmarks run on: real shapes or the study's own models, with the given layer counts."""

    models: str = "real_shapes"  # "real_shapes": teachers / student name REAL_SHAPES; "study": keys of study_models
    teachers: dict = field(default_factory=lambda: {"qwen2.5-1.5b": 7, "tinyllama-1.1b": 6})  # name -> layers
    student: str = "qwen2.5-0.5b"
    student_layers: int = 6
    study_models: dict = field(default_factory=dict)  # "study": name -> its teacher.teachers / train.student section
    full_vocab: bool = True  # the checkpoints' vocabulary sizes (else the tokenizers' own)
    examples: int = 64  # generated problems the stores hold
    batch_size: int = 4
    repeats: int = 5  # timed rounds after the warm-up round
    kv: dict = field(default_factory=lambda: {"weight": 0.1})  # KVConfig of the distillation step
    fusion: str = "router"  # kvlib.fusion kind, for several teachers
    budget: int = 32  # slots kept per (example, KV head) of the compressed stores and of the selection benchmark
    select_traces: int = 4  # reasoning traces the selection is timed on (generated problems joined, then cut) ...
    select_tokens: int = 512  # ... to this many tokens
    select_window: int = 32  # the observation window: the last tokens, whose attention decides importance
    growth_lengths: list = field(default_factory=lambda: [256, 1024, 4096, 16384])  # student tokens, increasing
    growth_dense_max: int = 4096  # the dense reference only up to this many tokens (its memory grows as Ts Tt)
    growth_layers: int = 2  # teacher and student layers of the growth benchmark
    full_depth: bool = False  # also ratio 1 with the student at its checkpoint's full depth ...
    full_depth_batch_size: int = 1  # ... on batches of this many examples ...
    full_depth_repeats: int = 3  # ... over this many timed rounds
    device: str = "auto"  # "auto" = cuda when available, else cpu
    seed: int = 0

    def __post_init__(self):
        check_choice("models", self.models, MODELS)
        if not self.teachers:
            raise ValueError("teachers must name at least one teacher with its layer count")
        layers = {n: v for n, v in self.teachers.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if layers:
            raise ValueError(f"teachers maps each teacher to the layers measured (an integer >= 1); got {layers}")
        if self.models == "real_shapes":
            unknown = sorted(set(self.teachers) - set(REAL_SHAPES) | ({self.student} - set(REAL_SHAPES)))
            if unknown:
                raise ValueError(f"no real shapes {unknown}; known: {sorted(REAL_SHAPES)} (or set models: study)")
            if self.study_models:
                raise ValueError("study_models are measured only with models: study; set it, or remove study_models")
        else:
            names = [*self.teachers, self.student]
            missing, unused = sorted(set(names) - set(self.study_models)), sorted(set(self.study_models) - set(names))
            if self.student in self.teachers or missing or unused:
                raise ValueError(
                    f"with models: study, teachers {sorted(self.teachers)} and the student {self.student!r} name "
                    f"distinct models of study_models {sorted(self.study_models)}; missing there: {missing}, "
                    f"named by neither: {unused}"
                )
            for name, section in self.study_models.items():
                try:
                    ModelConfig.from_params(section)
                except (TypeError, ValueError) as e:
                    raise type(e)(f"study_models.{name}: {e}") from e
        check_positive(
            self,
            "student_layers",
            "examples",
            "batch_size",
            "repeats",
            "budget",
            "select_traces",
            "select_tokens",
            "select_window",
            "growth_dense_max",
            "growth_layers",
            "full_depth_batch_size",
            "full_depth_repeats",
        )
        lengths = self.growth_lengths
        if (
            len(lengths) < 2
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 * len(SEGMENTS) for n in lengths)
            or sorted(set(lengths)) != list(lengths)
        ):
            raise ValueError(
                f"growth_lengths must be at least two increasing integers >= {2 * len(SEGMENTS)} (student tokens; "
                f"two points make a slope), got {lengths}"
            )
        if self.full_depth_batch_size > self.examples:
            raise ValueError(
                f"full_depth_batch_size ({self.full_depth_batch_size}) must be at most examples ({self.examples})"
            )
        if self.select_window >= self.select_tokens:
            raise ValueError(
                f"select_window ({self.select_window}) must be shorter than select_tokens ({self.select_tokens})"
            )
        if self.examples < max(self.batch_size, self.select_traces):
            raise ValueError(
                f"examples ({self.examples}) must be at least one batch ({self.batch_size}) and one problem per "
                f"selection trace ({self.select_traces})"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        from_dict(KVConfig, self.kv)


def kava_select_loop(
    attn: list[torch.Tensor],
    keys: list[torch.Tensor],
    observers: torch.Tensor,
    eligible: torch.Tensor,
    budget: int,
    lam: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference for ``teacher_kv.kava_select``: the KaVa rule (``kvlib.compress``) written as a loop over
    examples, KV heads, layers and key tokens, each token's importance and redundancy computed on its own.
    attn: L of (B, Hq, T, T); keys: L of (B, H, T, D); observers, eligible: (B, T). Returns (B, H, budget)
    positions and kept flags, as ``select_slots`` does."""
    B, Hq, T, _ = attn[0].shape
    H = keys[0].shape[1]
    group = Hq // H
    positions = torch.zeros(B, H, budget, dtype=torch.long)
    kept = torch.zeros(B, H, budget, dtype=torch.bool)
    for b in range(B):
        obs = observers[b].nonzero().flatten()
        elig = eligible[b].nonzero().flatten()
        n = len(elig)
        for h in range(H):
            total = torch.zeros(n)
            for a, k in zip(attn, keys):
                unit = torch.nn.functional.normalize(k[b, h, elig].float(), dim=-1)  # (n, D)
                imp, red = torch.zeros(n), torch.zeros(n)
                for i, t in enumerate(elig.tolist()):
                    mass = a[b, h * group : (h + 1) * group, obs, t].float().sum(-1)  # (group,)
                    imp[i] = mass.max()
                    sims = unit @ unit[i]  # (n,)
                    red[i] = -(sims.sum() - sims[i]) / max(n - 1, 1)
                imp = imp / imp.sum().clamp(min=1e-12)
                total += lam * imp + (1 - lam) * torch.softmax(red, dim=0)
            best = elig[(total / len(attn)).topk(min(budget, n)).indices].sort().values
            positions[b, h, : len(best)], kept[b, h, : len(best)] = best, True
    return positions, kept


def _device(cfg: BenchConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no GPU; use device 'auto' or 'cpu'")
        return torch.device("cuda")
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    return f"CPU {model}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def checkpoint_config(path: str | Path, pre_rope: bool):
    """``(config, None)``: the config.json of the local checkpoint folder ``path``; or ``(None, reason)`` where
    kvlib cannot distil that model (no decoder-only causal LM, no attention KV cache, or with ``pre_rope`` a
    RoPE that ``kvlib.rope`` cannot undo). A folder without config.json raises ValueError."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} holds no config.json; point the study model's path at a local checkpoint folder")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        _check_causal_lm_config(config, path)
        kv_spec(config)
        if pre_rope:
            rope_family(config)
    except ValueError as e:
        return None, str(e)
    return config, None


def _resolve(cfg: BenchConfig, name: str, layers: int, kv: KVConfig, texts: list[str], bpe_vocab: int):
    """``(config, tokenizer, entry)`` of the benchmark model ``name`` at ``layers`` layers, ``entry`` naming its
    source and shape; or ``(None, None, entry)`` whose ``reason`` says why it is not measured. A real shape gets a
    BPE tokenizer of ``bpe_vocab`` tokens trained on ``texts``; a checkpoint its own tokenizer."""
    if cfg.models == "real_shapes":
        tokenizer = train_tokenizer("bpe", texts, bpe_vocab)
        config = real_config(name, layers, REAL_SHAPES[name][8] if cfg.full_vocab else len(tokenizer))
        source, depth = f"real shape {name}", REAL_SHAPES[name][3]
    else:
        model = ModelConfig.from_params(cfg.study_models[name])
        if not model.path:
            reason = (
                f"{name} is built from a shape in the study, not a checkpoint named by path: its timings would "
                "measure Python overhead, not the KV path; benchmark real sizes with models: real_shapes"
            )
            return None, None, {"source": f"shape {asdict(model.shape)}", "reason": reason}
        config, reason = checkpoint_config(model.path, kv.pre_rope)
        if reason:
            return None, None, {"source": model.path, "reason": reason}
        tokenizer, text, source = load_tokenizer(model.path), decoder_config(config), model.path
        depth = text.num_hidden_layers
        if layers > depth:
            where = "student_layers" if name == cfg.student else f"teachers.{name}"
            raise ValueError(f"{name} ({model.path}) has {depth} layers; {where} must be at most {depth}, got {layers}")
        text.num_hidden_layers = layers
        if isinstance(getattr(text, "layer_types", None), list):
            text.layer_types = text.layer_types[:layers]  # one entry per layer
        if not cfg.full_vocab:
            text.vocab_size = len(tokenizer)
    text, spec = decoder_config(config), kv_spec(config)
    entry = {
        "source": source,
        "model_type": text.model_type,
        "num_hidden_layers": spec.num_layers,
        "checkpoint_layers": depth,  # the real model's depth
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
    }
    return config, tokenizer, entry


def _build(config, tokenizer, seed: int, entry: dict):
    """A model of ``config`` with random weights in float32 (a checkpoint's config may name bf16), as the study
    loads a checkpoint; its parameter count goes into ``entry``."""
    model = build_model(config, seed).float()
    check_vocabulary(model, tokenizer)
    entry["parameters"] = sum(p.numel() for p in model.parameters())
    return model


class _Bench:
    """Models, tokenizers, stores and the three kinds of training step, built once."""

    def __init__(self, cfg: BenchConfig, examples: list, student: tuple, teachers: list[tuple], workdir: Path):
        """``student``: ``(config, tokenizer, entry)``; ``teachers``: ``(name, config, tokenizer, entry)`` each."""
        self.cfg, self.device, self.examples = cfg, _device(cfg), examples
        gpu = self.device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()
        self.kv_cfg = from_dict(KVConfig, cfg.kv)
        self.names, self.teachers, self.stores, self.compressed = [], [], [], []
        pre_rope = self.kv_cfg.pre_rope
        for i, (name, config, tok, entry) in enumerate(progress(teachers, desc="benchmark teachers and stores")):
            model = _build(config, tok, cfg.seed + 1 + i, entry).eval()
            model = model.to(self.device, torch.bfloat16 if gpu else torch.float32)
            self.names.append(name)
            self.teachers.append((model, tok))
            self.stores.append(
                extract_store(model, tok, examples, workdir / f"store-{i}", pre_rope=pre_rope, progress=False)
            )
            self.compressed.append(
                extract_store(
                    model,
                    tok,
                    examples,
                    workdir / f"compressed-{i}",
                    pre_rope=pre_rope,
                    budget=cfg.budget,
                    progress=False,
                )
            )
        self.set_student(student)

    def set_student(self, student: tuple) -> None:
        """Build the student ``(config, tokenizer, entry)``, its aligners to the stores, fusion and optimizer."""
        config, self.tok_s, entry = student
        self.student = _build(config, self.tok_s, self.cfg.seed, entry).to(self.device)
        spec_s = kv_spec(self.student.config)
        aligners = [
            TeacherAligner(
                store.spec,
                spec_s,
                layer_map(store.spec.num_layers, spec_s.num_layers, "uniform"),
                self.kv_cfg.projector,
                self.kv_cfg.time_align,
            )
            for store in self.stores
        ]
        fusion = None
        if len(aligners) > 1:
            hidden = decoder_config(self.student.config).hidden_size
            fusion = make_fusion(self.cfg.fusion, len(aligners), spec_s.num_layers, hidden, len(TASKS))
        self.kv_model = Distiller(self.student, aligners, self.kv_cfg, fusion).to(self.device)
        self.ce_model = Distiller(self.student)
        self.optimizer = torch.optim.AdamW(self.kv_model.parameters(), lr=1e-5)  # CE steps leave aligners unused
        self.collate_ce = collate_fn(self.tok_s, self.examples)
        self.collate_store = collate_fn(self.tok_s, self.examples, self.stores)

    def batch(self, round_: int) -> list[int]:
        start = round_ * self.cfg.batch_size % (len(self.examples) - self.cfg.batch_size + 1)
        return list(range(start, start + self.cfg.batch_size))

    def online(self, indices: list[int]) -> dict:
        batch = self.collate_ce(indices)
        chunk = [self.examples[i] for i in indices]
        batch["teachers"] = [online_batch(model, tok, chunk, self.kv_cfg.pre_rope) for model, tok in self.teachers]
        return batch

    def step(self, model: Distiller, batch: dict) -> None:
        batch = send_to_device(batch, self.device)
        with self.autocast:
            terms = model(batch)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.kv_model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def variants(self, indices: list[int]) -> dict:
        """name -> a callable running that variant once on the examples ``indices``."""
        return {
            "ce": lambda: self.step(self.ce_model, self.collate_ce(indices)),
            "kv_store": lambda: self.step(self.kv_model, self.collate_store(indices)),
            "kv_online": lambda: self.step(self.kv_model, self.online(indices)),
        }

    def alignment(self, indices: list[int]):
        """A callable running ``kv_terms`` forward and backward on the student's detached cache of ``indices``."""
        batch = send_to_device(self.collate_store(indices), self.device)
        router = self.kv_model.fusion is not None and self.cfg.fusion == "router"
        attention = self.kv_model.fusion is not None and self.cfg.fusion == "attention"
        with torch.no_grad(), self.autocast:
            out = forward_with_kv(self.student, batch["input_ids"], batch["attention_mask"], router, attention)
        weights = self.kv_model.term_weights()

        def run():
            kv = [(k.detach().requires_grad_(), v.detach().requires_grad_()) for k, v in out.kv]
            with self.autocast:
                terms = self.kv_model.kv_terms(kv, batch, out.hidden, out.queries)
            sum(weights[n] * terms[n] for n in ("kv", "relation", "entropy") if n in terms).backward()
            self.optimizer.zero_grad(set_to_none=True)

        return run


STEPS = ("ce", "kv_store", "kv_online", "alignment")


def _step_times(bench: _Bench, names: tuple = STEPS) -> dict:
    """Seconds per variant of ``names`` in each of ``repeats`` interleaved rounds (after one warm-up round), their
    medians, student tokens per second, and the paired ratios: per round, then the median over rounds."""
    times: dict[str, list[float]] = {}
    tokens = []
    for round_ in progress(range(bench.cfg.repeats + 1), desc="benchmark rounds (1 warm-up)"):
        indices = bench.batch(round_)
        runs = bench.variants(indices) | ({"alignment": bench.alignment(indices)} if "alignment" in names else {})
        runs = [(name, runs[name]) for name in names]
        for name, run in runs[round_ % len(runs) :] + runs[: round_ % len(runs)]:  # each round starts elsewhere
            seconds = _timed(run, bench.device)
            if round_:
                times.setdefault(name, []).append(seconds)
        if round_:
            tokens.append(int(bench.collate_ce(indices)["attention_mask"].sum()))
    out = {name: {"median": statistics.median(t), "all": [round(x, 5) for x in t]} for name, t in times.items()}
    for name in {"ce", "kv_store", "kv_online"} & set(names):
        out[name]["tokens_per_second"] = statistics.median(n / t for n, t in zip(tokens, times[name]))
    pairs = {"kv_store_vs_ce": ("kv_store", "ce"), "online_vs_store": ("kv_online", "kv_store")}
    pairs["alignment_share"] = ("alignment", "kv_store")
    out["paired"] = {
        name: [a / b for a, b in zip(times[num], times[den])]
        for name, (num, den) in pairs.items()
        if {num, den} <= set(names)
    }
    return out


def _selection(bench: _Bench) -> dict:
    """The vectorised KaVa-rule selection vs the per-token loop on the first teacher's attention over ``select_traces``
    reasoning traces of ``select_tokens`` tokens (generated problems joined), the last ``select_window`` observing."""
    cfg, cpu = bench.cfg, torch.device("cpu")
    model, tok = bench.teachers[0]
    texts = ["\n\n".join(e.text for e in bench.examples[i :: cfg.select_traces]) for i in range(cfg.select_traces)]
    enc = encode_batch(tok, texts)
    ids, mask = enc["input_ids"][:, : cfg.select_tokens], enc["attention_mask"][:, : cfg.select_tokens]
    device = next(model.parameters()).device
    with torch.no_grad():
        kv, attn = extract_kv_and_attention(model, ids.to(device), mask.to(device))
    positions = torch.arange(ids.shape[1], device=device)
    if bench.kv_cfg.pre_rope:  # as extract_store scores them
        kv = [(unrotate_keys(k, positions, model.config), v) for k, v in kv]
    keys = [k.float().cpu() for k, _ in kv]
    attn = [a.float().cpu() for a in attn]
    t, length = torch.arange(ids.shape[1])[None], mask.sum(1, keepdim=True)  # (1, T), (B, 1)
    observers, eligible = (t >= length - cfg.select_window) & (t < length), t < length - cfg.select_window
    args = (attn, keys, observers, eligible, cfg.budget)
    fast = [_timed(lambda: kava_select(*args), cpu) for _ in range(cfg.repeats + 1)][1:]
    slow = [
        _timed(lambda: kava_select_loop(*args), cpu) for _ in progress(range(2), desc="benchmark per-token selection")
    ]
    (p1, k1), (p2, k2) = kava_select(*args), kava_select_loop(*args)
    return {
        "vectorised_seconds": statistics.median(fast),
        "loop_seconds": statistics.median(slow),
        "value": statistics.median(slow) / statistics.median(fast),
        "identical_slots": float(((p1 == p2) & (k1 == k2)).float().mean()),
        "shape": {"layers": len(attn), "attn": list(attn[0].shape), "keys": list(keys[0].shape)},
        "eligible_tokens": eligible.sum(1).tolist(),
    }


def _store_bytes(bench: _Bench) -> dict:
    out = {}
    for name, store, small in zip(bench.names, bench.stores, bench.compressed):
        full, cut = store.footprint(), small.footprint()
        out[name] = {
            "spec": vars(store.spec),
            "tokens": full["tokens"],
            "dense_fp32_bytes_per_token": full["dense_fp32_bytes_per_token"],
            "fp16_bytes_per_token": full["bytes_per_token"],
            "fp16_ratio": full["ratio_to_dense_fp32"],
            "budget": bench.cfg.budget,
            "budget_bytes_per_token": cut["bytes_per_token"],
            "budget_ratio": cut["ratio_to_dense_fp32"],
        }
    return out


def _status_kib(name: str) -> int:
    return int(re.search(rf"^{name}:\s+(\d+) kB", _read("/proc/self/status"), re.M).group(1))


def peak_bytes(fn, device: torch.device) -> int:
    """Peak memory of ``fn()`` above what was held before it (see the module docstring for how)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024


def _pin_allocator(device: torch.device) -> str | None:
    """Pin glibc's mmap and trim thresholds for the CPU probe (after the step timings); why not, where it cannot."""
    if device.type == "cpu":
        if not Path("/proc/self/clear_refs").exists():
            return "peak resident memory needs Linux /proc/self/clear_refs"
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: tensors above 64 KiB are mapped and unmapped
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD: give freed heap back
    return None


def _peak_memory(bench: _Bench) -> dict:
    out = {}
    for name, run in progress(bench.variants(bench.batch(0)).items(), desc="benchmark peak memory"):
        run()  # a first call after the allocator change
        out[f"{name}_bytes"] = peak_bytes(run, bench.device)
    if out["ce_bytes"] <= 0:  # a tiny student: the step fits in memory already held
        return out | {"no_ratios": "the CE step raised peak memory by nothing measurable"}
    out["kv_store_vs_ce"] = out["kv_store_bytes"] / out["ce_bytes"]
    out["kv_online_vs_ce"] = out["kv_online_bytes"] / out["ce_bytes"]
    return out


def _full_depth(bench: _Bench, student: tuple) -> dict:
    """Ratio 1 (KV step from the stores / CE step) with ``student`` at its full depth, on the same stores."""
    cfg = bench.cfg
    full = copy.copy(bench)
    full.cfg = from_dict(
        BenchConfig, asdict(cfg) | {"batch_size": cfg.full_depth_batch_size, "repeats": cfg.full_depth_repeats}
    )
    full.set_student(student)
    out = _step_times(full, ("ce", "kv_store"))
    out["student_layers"] = student[2]["num_hidden_layers"]
    out["batch_size"] = cfg.full_depth_batch_size
    return out


def _store_read(bench: _Bench) -> dict:
    """Per teacher store: MB/s of float32 KV that ``KVStore.batch`` delivers reading all examples in batches of
    ``batch_size``, opened afresh (verify and load every shard) and again from its cache, vs MB/s of the shard
    files' raw bytes (``Path.read_bytes``); each the median of ``repeats`` passes, all from the page cache."""
    cfg, out = bench.cfg, {}
    chunks = [
        list(range(i, min(i + cfg.batch_size, len(bench.examples))))
        for i in range(0, len(bench.examples), cfg.batch_size)
    ]
    for name, store in zip(bench.names, bench.stores):
        files = sorted(store.directory.glob("shard-*.safetensors"))
        file_bytes = sum(f.stat().st_size for f in files)
        cpu = torch.device("cpu")
        raw = [_timed(lambda files=files: [f.read_bytes() for f in files], cpu) for _ in range(cfg.repeats)]
        delivered = sum(x.numel() * x.element_size() for i in chunks for pair in store.batch(i)["kv"] for x in pair)
        passes = {"fresh": [], "cached": []}
        for _ in range(cfg.repeats):
            fresh = KVStore(store.directory)
            for kind in passes:
                passes[kind].append(_timed(lambda s=fresh: [s.batch(i) for i in chunks], torch.device("cpu")))
        out[name] = {
            "file_bytes": file_bytes,
            "delivered_bytes": delivered,
            "raw_file_mb_per_s": file_bytes / 1e6 / statistics.median(raw),
            "store_fresh_mb_per_s": delivered / 1e6 / statistics.median(passes["fresh"]),
            "store_cached_mb_per_s": delivered / 1e6 / statistics.median(passes["cached"]),
        }
    return out


class DenseAligner(TeacherAligner):
    """``TeacherAligner`` as it was before time taps, the dense reference of the growth benchmark: the (B, Ts, Tt)
    ``time_alignment`` matrix, renormalised over each head's kept slots, and one einsum (memory ~ Ts Tt)."""

    def forward(self, teacher: dict, student: dict) -> tuple[list, list, torch.Tensor]:
        kv_t, keep = teacher["kv"], teacher["mask"]
        A = time_alignment(
            self.time_align,
            teacher["attention_mask"].bool(),
            student["attention_mask"].bool(),
            teacher["offsets"],
            student["offsets"],
            teacher["segment_bounds"],
            student["segment_bounds"],
        )  # (B, Ts, Tt)
        A = A[:, None] * keep.float()[:, :, None, :]  # (B, Ht, Ts, Tt)
        mass = A.sum(-1)  # (B, Ht, Ts)
        A = A / mass.clamp(min=1e-12)[..., None]
        keys = torch.stack([k for k, _ in kv_t]).float()  # (Lt, B, Ht, Tt, Dt)
        values = torch.stack([v for _, v in kv_t]).float()
        keys = torch.einsum("sl,lbhtd,bhxt->sbhxd", self.layer_weights, keys, A)  # (Ls, B, Ht, Ts, Dt)
        values = torch.einsum("sl,lbhtd,bhxt->sbhxd", self.layer_weights, values, A)
        targets = [proj(k, v) for proj, k, v in zip(self.projectors, keys, values)]  # Ls x (B, Hs, Ts, Ds)
        covered = student["attention_mask"].bool() & (mass > 0).all(1)  # (B, Ts)
        return targets, list(zip(keys, values)), covered


def growth_exponent(lengths: list[int], values: list[float]) -> float:
    """The least-squares slope of log(values) on log(lengths): ``p`` where values ~ c T^p."""
    x, y = torch.tensor(lengths, dtype=torch.float64).log(), torch.tensor(values, dtype=torch.float64).log()
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def _synthetic_batch(T: int, specs_t: list[KVSpec], spec_s: KVSpec, hidden: int, gen: torch.Generator):
    """One example (batch 1) of ``T`` student tokens of 5 characters and ``5 T / 4`` teacher tokens of 4 for each
    teacher, three equal segments: the student batch (with the teachers' store-like batches), the student's KV,
    hidden states and queries of the benchmark's real shapes, random."""
    C, Tt = 5 * T, (5 * T + 3) // 4  # characters, teacher tokens
    S = len(SEGMENTS)

    def side(n, width):  # (1, n) mask, (1, n, 2) offsets tiling [0, C), (1, S + 1) segment bounds
        start = torch.arange(n) * width
        offsets = torch.stack([start, (start + width).clamp(max=C)], -1)[None]  # (1, n, 2)
        return torch.ones(1, n, dtype=torch.long), offsets, (torch.arange(S + 1) * n // S)[None]

    mask_s, offsets_s, bounds_s = side(T, 5)
    mask_t, offsets_t, bounds_t = side(Tt, 4)
    teachers = [
        {
            "kv": [
                tuple(torch.randn(1, s.num_kv_heads, Tt, s.head_dim, generator=gen) for _ in "kv")
                for _ in range(s.num_layers)
            ],
            "mask": torch.ones(1, s.num_kv_heads, Tt, dtype=torch.bool),
            "attention_mask": mask_t,
            "offsets": offsets_t,
            "segment_bounds": bounds_t,
        }
        for s in specs_t
    ]
    batch = {"attention_mask": mask_s, "offsets": offsets_s, "segment_bounds": bounds_s}
    batch |= {"task_ids": torch.zeros(1, dtype=torch.long), "teachers": teachers}
    H, D, L = spec_s.num_kv_heads, spec_s.head_dim, spec_s.num_layers
    kv_s = [tuple(torch.randn(1, H, T, D, generator=gen) for _ in "kv") for _ in range(L)]
    hidden_s = [torch.randn(1, T, hidden, generator=gen) for _ in range(L)]
    queries = [torch.randn(1, H, T, D, generator=gen) for _ in range(L)]
    return batch, kv_s, hidden_s, queries


class _Growth:
    """The growth benchmark's two models (sparse and dense aligners, fusion and loss as configured) on the given
    configs at ``growth_layers`` layers; ``run(path, T)`` builds the inputs, returns the forward and backward call."""

    def __init__(self, cfg: BenchConfig, student_config, teacher_configs: dict, device: torch.device):
        self.cfg, self.device = cfg, device
        kv, L = from_dict(KVConfig, cfg.kv), cfg.growth_layers
        self.specs_t = {n: KVSpec(L, kv_spec(c).num_kv_heads, kv_spec(c).head_dim) for n, c in teacher_configs.items()}
        config = copy.deepcopy(student_config)
        decoder_config(config).num_hidden_layers = L
        self.spec_s = KVSpec(L, kv_spec(config).num_kv_heads, kv_spec(config).head_dim)
        self.hidden = decoder_config(config).hidden_size
        student = SimpleNamespace(config=config)  # kv_terms reads only the student's config (to un-rotate keys)
        self.models = {}
        for path, kind in (("sparse", TeacherAligner), ("dense", DenseAligner)):
            torch.manual_seed(cfg.seed)
            aligners = [
                kind(s, self.spec_s, layer_map(L, L, "uniform"), kv.projector, kv.time_align)
                for s in self.specs_t.values()
            ]
            fusion = None
            if len(aligners) > 1:
                fusion = make_fusion(cfg.fusion, len(aligners), L, self.hidden, len(TASKS))
            self.models[path] = Distiller(student, aligners, kv, fusion).to(device)

    def run(self, path: str, T: int):
        model = self.models[path]
        gen = torch.Generator().manual_seed(self.cfg.seed + T)
        batch, kv_s, hidden, queries = send_to_device(
            _synthetic_batch(T, list(self.specs_t.values()), self.spec_s, self.hidden, gen), self.device
        )
        weights = model.term_weights()

        def run():
            kv = [(k.detach().requires_grad_(), v.detach().requires_grad_()) for k, v in kv_s]
            terms = model.kv_terms(kv, batch, hidden, queries)
            sum(weights[n] * terms[n] for n in ("kv", "relation", "entropy") if n in terms).backward()
            model.zero_grad(set_to_none=True)

        return run


def _growth_times(growth: _Growth) -> dict:
    """Per path: the lengths measured, median seconds over ``repeats`` (after a warm-up call) and the exponent."""
    cfg, out = growth.cfg, {}
    for path in ("sparse", "dense"):
        lengths = [T for T in cfg.growth_lengths if path == "sparse" or T <= cfg.growth_dense_max]
        seconds = []
        for T in progress(lengths, desc=f"benchmark growth, {path}"):
            run = growth.run(path, T)
            seconds.append(statistics.median([_timed(run, growth.device) for _ in range(cfg.repeats + 1)][1:]))
        out[path] = {"lengths": lengths, "seconds": seconds}
        out[path]["exponent"] = growth_exponent(lengths, seconds) if len(lengths) > 1 else None
        skipped = [T for T in cfg.growth_lengths if T not in lengths]
        if skipped:
            out[path]["skipped"] = {
                "lengths": skipped,
                "reason": f"above growth_dense_max ({cfg.growth_dense_max}): the dense (Ts, Tt) alignment's memory "
                "grows as the product of the lengths",
            }
    return out


def _growth_memory(growth: _Growth, times: dict) -> None:
    """Add each measured length's peak bytes (see ``peak_bytes``) and their exponent over positive peaks."""
    for path, series in times.items():
        peaks = []
        for T in progress(series["lengths"], desc=f"benchmark growth memory, {path}"):
            run = growth.run(path, T)
            run()  # a first call after the allocator change
            peaks.append(peak_bytes(run, growth.device))
        series["peak_bytes"] = peaks
        positive = [(T, p) for T, p in zip(series["lengths"], peaks) if p > 0]
        series["memory_exponent"] = growth_exponent(*zip(*positive)) if len(positive) > 1 else None


def _verdict(name: str, value: float) -> dict:
    if name not in TARGETS:
        return {"value": value}
    op, target = TARGETS[name]
    met = value <= target if op == "<=" else value >= target
    return {"value": value, "target": f"{op} {target}", "met": bool(met)}


def run_benchmarks(params: dict, workdir: str | Path | None = None) -> dict:
    """Run all the benchmarks with ``BenchConfig`` ``params``; returns the results (JSON-ready), whose ``models``
    name what was measured (source and shape of each model) or why a model was not (``reason``); without a
    measurable student or teacher the results hold ``skipped`` instead of measurements.

    The KV stores are written to ``workdir`` (default: a temporary folder, removed afterwards)."""
    cfg = from_dict(BenchConfig, params)
    start = time.perf_counter()
    examples = generate(cfg.examples, seed=cfg.seed, max_operand=9)
    texts, kv = [e.text for e in examples], from_dict(KVConfig, cfg.kv)
    student = _resolve(cfg, cfg.student, cfg.student_layers, kv, texts, 384)
    teachers = {
        n: _resolve(cfg, n, layers, kv, texts, 512 + 128 * i) for i, (n, layers) in enumerate(cfg.teachers.items())
    }
    models = {"student": student[2], "teachers": {n: t[2] for n, t in teachers.items()}, "weights": WEIGHTS}
    head = {"device": describe_device(_device(cfg)), "config": asdict(cfg), "models": models}
    measured = [(n, *t) for n, t in teachers.items() if t[0] is not None]
    if student[0] is None or not measured:
        return head | {"skipped": "nothing measured: the student and at least one teacher are needed (see models)"}
    with tempfile.TemporaryDirectory() as tmp:
        bench = _Bench(cfg, examples, student, measured, Path(workdir or tmp))
        setup_seconds = time.perf_counter() - start
        steps = _step_times(bench)
        selection = _selection(bench)
        stores = _store_bytes(bench)
        # Peak memory first, before larger runs leave freed but resident heap that later steps would reuse
        # unseen (the full-depth student's); the growth and full-depth timings run with the allocator pinned.
        unpinned = _pin_allocator(bench.device)
        memory = {"skipped": unpinned} if unpinned else _peak_memory(bench)
        growth = _Growth(cfg, student[0], {n: c for n, c, _, _ in measured}, bench.device)
        growth_series = _growth_times(growth)
        if not unpinned:
            _growth_memory(growth, growth_series)
        store_read = _store_read(bench)
        full = None
        if cfg.full_depth:
            depth = student[2]["checkpoint_layers"]
            full = _full_depth(bench, _resolve(cfg, cfg.student, depth, kv, texts, 384))
    paired = steps.pop("paired")
    ratios = {name: _verdict(name, statistics.median(per_round)) for name, per_round in paired.items()}
    ratios |= {
        "selection_speedup": _verdict("selection_speedup", selection["value"])
        | {"identical_slots": selection["identical_slots"]},
        "store_fp16_vs_dense_fp32": {"value": {n: s["fp16_ratio"] for n, s in stores.items()}},
        "store_budget_vs_dense_fp32": {"value": {n: s["budget_ratio"] for n, s in stores.items()}},
    }
    if "kv_store_vs_ce" in memory:
        ratios["peak_memory_kv_store_vs_ce"] = {"value": memory["kv_store_vs_ce"]}
    ratios["growth_exponent_sparse"] = _verdict("growth_exponent_sparse", growth_series["sparse"]["exponent"])
    if growth_series["dense"]["exponent"] is not None:
        ratios["growth_exponent_dense"] = {"value": growth_series["dense"]["exponent"]}
    if full is not None:
        per_round = full.pop("paired")["kv_store_vs_ce"]
        ratios["kv_store_vs_ce_full_depth"] = _verdict("kv_store_vs_ce_full_depth", statistics.median(per_round))
        full["paired_kv_store_vs_ce"] = per_round
    growth_shapes = {"student": vars(growth.spec_s), "teachers": {n: vars(s) for n, s in growth.specs_t.items()}}
    growth_shapes |= {"batch": 1, "teacher_tokens_per_student_token": 1.25, "time_align": kv.time_align}
    return head | {
        "setup_seconds": round(setup_seconds, 1),
        "ratios": ratios,
        "step_seconds": steps,
        "paired_ratios": paired,
        "selection": selection,
        "store_bytes": stores,
        "peak_memory": memory,
        "growth": {"shapes": growth_shapes, "fusion": cfg.fusion if len(measured) > 1 else None} | growth_series,
        "full_depth": full if full is not None else {"skipped": "full_depth is off"},
        "store_read": store_read,
    }
