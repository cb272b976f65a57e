"""Speed and memory of KV distillation on real-shaped models: six ratios, each measured side by side in one run.

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
   models and optimizer state already hold.

Models are built from the published configs of real checkpoints (``kvlib.models.REAL_SHAPES``), random
weights, with the layer counts of the params (fewer than the real ones where CPU time or memory needs
it); each model has its own BPE tokenizer trained on the generated problems, so time alignment is real.
A training step is what ``kvlib.train`` does per micro-batch: collate (encode; read the store or run the
teachers), move to the device, forward, backward, clip, AdamW step. Timed variants run interleaved, one
round after another after a warm-up round, each round starting with another variant; a ratio is the
median over rounds of the ratio within a round, so that a slow moment of a shared machine hits both
sides alike. On a GPU each timed region ends with a synchronize, the student trains under bf16
autocast (as ``accelerate`` mixed precision does) and the teachers run in bf16.
Peak memory on a GPU is torch's peak allocated bytes; on a CPU the peak resident set (Linux ``VmHWM``,
reset through ``/proc/self/clear_refs``) above the resident set before the step, measured after all
timings with glibc's mmap threshold pinned at 64 KiB so that freed tensors go back to the system.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import platform
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import send_to_device

from kvlib.config import KVConfig, check_positive, from_dict
from kvlib.data import TASKS, generate
from kvlib.distill import Distiller, TeacherAligner, collate_fn
from kvlib.fusion import make_fusion
from kvlib.hf import extract_kv_and_attention, forward_with_kv, kv_spec
from kvlib.layers import layer_map
from kvlib.models import REAL_SHAPES, build_model, real_config
from kvlib.rope import unrotate_keys
from kvlib.teacher_kv import extract_store, kava_select, online_batch
from kvlib.text import encode_batch, train_tokenizer

TARGETS = {"kv_store_vs_ce": ("<=", 1.15), "alignment_share": ("<=", 0.10), "selection_speedup": (">=", 50.0)}


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmarks run on: real shapes (``REAL_SHAPES`` names) with the given layer counts."""

    teachers: dict = field(default_factory=lambda: {"qwen2.5-1.5b": 7, "tinyllama-1.1b": 6})  # name -> layers
    student: str = "qwen2.5-0.5b"
    student_layers: int = 6
    full_vocab: bool = True  # the checkpoints' vocabulary sizes (else the BPE tokenizers' own)
    examples: int = 64  # generated problems the stores hold
    batch_size: int = 4
    repeats: int = 5  # timed rounds after the warm-up round
    kv: dict = field(default_factory=lambda: {"weight": 0.1})  # KVConfig of the distillation step
    fusion: str = "router"  # kvlib.fusion kind, for several teachers
    budget: int = 32  # slots kept per (example, KV head) of the compressed stores and of the selection benchmark
    select_traces: int = 4  # reasoning traces the selection is timed on (generated problems joined, then cut) ...
    select_tokens: int = 512  # ... to this many tokens
    select_window: int = 32  # the observation window: the last tokens, whose attention decides importance
    device: str = "auto"  # "auto" = cuda when available, else cpu
    seed: int = 0

    def __post_init__(self):
        unknown = sorted(set(self.teachers) - set(REAL_SHAPES) | ({self.student} - set(REAL_SHAPES)))
        if unknown:
            raise ValueError(f"no real shapes {unknown}; known: {sorted(REAL_SHAPES)}")
        if not self.teachers:
            raise ValueError("teachers must name at least one real shape with its layer count")
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


class _Bench:
    """Models, tokenizers, stores and the three kinds of training step, built once."""

    def __init__(self, cfg: BenchConfig, workdir: Path):
        self.cfg, self.device = cfg, _device(cfg)
        gpu = self.device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()
        self.examples = generate(cfg.examples, seed=cfg.seed, max_operand=9)
        texts = [e.text for e in self.examples]
        self.tok_s = train_tokenizer("bpe", texts, 384)
        vocab = REAL_SHAPES[cfg.student][8] if cfg.full_vocab else len(self.tok_s)
        self.student = build_model(real_config(cfg.student, cfg.student_layers, vocab), cfg.seed).to(self.device)
        spec_s = kv_spec(self.student.config)
        self.teachers, self.stores, self.compressed = [], [], []
        for i, (name, layers) in enumerate(cfg.teachers.items()):
            tok = train_tokenizer("bpe", texts, 512 + 128 * i)  # each teacher its own tokenizer
            vocab = REAL_SHAPES[name][8] if cfg.full_vocab else len(tok)
            model = build_model(real_config(name, layers, vocab), cfg.seed + 1 + i).eval()
            model = model.to(self.device, torch.bfloat16 if gpu else torch.float32)
            self.teachers.append((model, tok))
            self.stores.append(extract_store(model, tok, self.examples, workdir / f"store-{i}", progress=False))
            self.compressed.append(
                extract_store(model, tok, self.examples, workdir / f"compressed-{i}", budget=cfg.budget, progress=False)
            )
        self.kv_cfg = from_dict(KVConfig, cfg.kv)
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
            hidden = self.student.config.hidden_size
            fusion = make_fusion(cfg.fusion, len(aligners), spec_s.num_layers, hidden, len(TASKS))
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
        batch["teachers"] = [online_batch(model, tok, chunk) for model, tok in self.teachers]
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


def _step_times(bench: _Bench) -> dict:
    """Seconds per variant in each of ``repeats`` interleaved rounds (after one warm-up round), their medians,
    student tokens per second, and the paired ratios: per round, then the median over rounds."""
    times: dict[str, list[float]] = {}
    tokens = []
    for round_ in range(bench.cfg.repeats + 1):
        indices = bench.batch(round_)
        runs = list((bench.variants(indices) | {"alignment": bench.alignment(indices)}).items())
        for name, run in runs[round_ % len(runs) :] + runs[: round_ % len(runs)]:  # each round starts elsewhere
            seconds = _timed(run, bench.device)
            if round_:
                times.setdefault(name, []).append(seconds)
        if round_:
            tokens.append(int(bench.collate_ce(indices)["attention_mask"].sum()))
    out = {name: {"median": statistics.median(t), "all": [round(x, 5) for x in t]} for name, t in times.items()}
    for name in ("ce", "kv_store", "kv_online"):
        out[name]["tokens_per_second"] = statistics.median(n / t for n, t in zip(tokens, times[name]))
    pairs = {"kv_store_vs_ce": ("kv_store", "ce"), "online_vs_store": ("kv_online", "kv_store")}
    pairs["alignment_share"] = ("alignment", "kv_store")
    out["paired"] = {name: [a / b for a, b in zip(times[num], times[den])] for name, (num, den) in pairs.items()}
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
    keys = [unrotate_keys(k, positions, model.config).float().cpu() for k, _ in kv]  # as extract_store scores them
    attn = [a.float().cpu() for a in attn]
    t, length = torch.arange(ids.shape[1])[None], mask.sum(1, keepdim=True)  # (1, T), (B, 1)
    observers, eligible = (t >= length - cfg.select_window) & (t < length), t < length - cfg.select_window
    args = (attn, keys, observers, eligible, cfg.budget)
    fast = [_timed(lambda: kava_select(*args), cpu) for _ in range(cfg.repeats + 1)][1:]
    slow = [_timed(lambda: kava_select_loop(*args), cpu) for _ in range(2)]
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
    for (name, _), store, small in zip(bench.cfg.teachers.items(), bench.stores, bench.compressed):
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


def _peak_memory(bench: _Bench) -> dict:
    if bench.device.type == "cpu":
        if not Path("/proc/self/clear_refs").exists():
            return {"skipped": "peak resident memory needs Linux /proc/self/clear_refs"}
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: tensors above 64 KiB are mapped and unmapped
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD: give freed heap back
    out = {}
    for name, run in bench.variants(bench.batch(0)).items():
        run()  # a first call after the allocator change
        out[f"{name}_bytes"] = peak_bytes(run, bench.device)
    out["kv_store_vs_ce"] = out["kv_store_bytes"] / out["ce_bytes"]
    out["kv_online_vs_ce"] = out["kv_online_bytes"] / out["ce_bytes"]
    return out


def _verdict(name: str, value: float) -> dict:
    if name not in TARGETS:
        return {"value": value}
    op, target = TARGETS[name]
    met = value <= target if op == "<=" else value >= target
    return {"value": value, "target": f"{op} {target}", "met": bool(met)}


def run_benchmarks(params: dict, workdir: str | Path | None = None) -> dict:
    """Run all six benchmarks with ``BenchConfig`` ``params``; returns the results (JSON-ready).

    The KV stores are written to ``workdir`` (default: a temporary folder, removed afterwards)."""
    cfg = from_dict(BenchConfig, params)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        bench = _Bench(cfg, Path(workdir or tmp))
        setup_seconds = time.perf_counter() - start
        steps = _step_times(bench)
        selection = _selection(bench)
        stores = _store_bytes(bench)
        memory = _peak_memory(bench)
    specs = {name: vars(kv_spec(model.config)) for name, (model, _) in zip(cfg.teachers, bench.teachers)}
    paired = steps.pop("paired")
    ratios = {name: _verdict(name, statistics.median(per_round)) for name, per_round in paired.items()}
    ratios |= {
        "selection_speedup": _verdict("selection_speedup", selection["value"])
        | {"identical_slots": selection["identical_slots"]},
        "store_fp16_vs_dense_fp32": {"value": {n: s["fp16_ratio"] for n, s in stores.items()}},
        "store_budget_vs_dense_fp32": {"value": {n: s["budget_ratio"] for n, s in stores.items()}},
    }
    if "skipped" not in memory:
        ratios["peak_memory_kv_store_vs_ce"] = {"value": memory["kv_store_vs_ce"]}
    return {
        "device": describe_device(bench.device),
        "config": asdict(cfg),
        "models": {
            "student": {"shape": cfg.student, **vars(kv_spec(bench.student.config))},
            "teachers": {n: {"shape": n, **s} for n, s in specs.items()},
            "student_parameters": sum(p.numel() for p in bench.student.parameters()),
            "teacher_parameters": {
                n: sum(p.numel() for p in m.parameters()) for n, (m, _) in zip(specs, bench.teachers)
            },
        },
        "setup_seconds": round(setup_seconds, 1),
        "ratios": ratios,
        "step_seconds": steps,
        "paired_ratios": paired,
        "selection": selection,
        "store_bytes": stores,
        "peak_memory": memory,
    }
