"""The training loop: one plain loop on ``accelerate`` for teachers, CE-only students and KV distillation.

The same code runs on a CPU, one GPU, several GPUs or several nodes (``accelerate launch``): all
trainable computation sits in one module's ``forward(batch) -> loss terms`` (``kvlib.objective.CausalLM``
for CE only, ``kvlib.distill.Distiller`` with teachers). Notable choices:

- **fixed compute**: training runs for ``steps`` optimizer steps of ``batch_size x grad_accum``
  examples per process (``drop_last``), so groups compared in a study see the same number of
  examples; under data parallelism each step takes ``num_processes`` times as many;
- **reproducible data order**: epoch ``e`` shuffles with a generator seeded by ``seed + e``, so a
  resumed run skips exactly the micro-batches it had consumed and sees the same order;
- **checkpoints** (model, optimizer, RNG states by ``accelerate``; step, tokens, the LR scheduler's few
  numbers and the run's fingerprint in ``state.json``) are written to ``checkpoint.tmp``, then the old one
  is moved to ``checkpoint.old``, the new one renamed to ``checkpoint`` and the old one removed. A run
  started in a folder first repairs what a kill at any point of that sequence left (a checkpoint moved
  aside whose successor never arrived is put back; a partial ``.tmp`` or a stale ``.old`` is removed),
  then resumes from ``checkpoint`` and ends with the same parameters as an uninterrupted run;
  ``stop_at`` ends a call early after checkpointing (time-sliced cluster jobs);
- **no pickle from the folder**: ``accelerate`` loads model, optimizer and RNG states with
  ``weights_only=True``; the scheduler is not registered with it (it would be unpickled with
  ``weights_only=False``) but kept as JSON, and a checkpoint holding a ``custom_checkpoint_*.pkl`` is refused;
- **fingerprint**: ``state.json`` records the TrainConfig and the caller's ``fingerprint`` (everything else
  that determines the run: model params, group, seed, data) and their SHA-256; resuming with another one
  raises, naming what differs, instead of mixing two configurations. The last checkpoint is kept after
  the end, so re-running a finished folder with the same fingerprint trains no step and writes the same
  ``model/`` again, and with another one is refused;
- **non-finite values stop training**: every micro-batch's loss terms, and the gradient norm before each
  optimizer step (unless fp16's gradient scaler, which skips such steps itself, is on), must be finite,
  else ``FloatingPointError`` names the term and the step, before any parameter is updated with it or a
  checkpoint is written: the last checkpoint stays the last good state (under a launcher, the process that
  sees a non-finite loss raises and the launcher ends the others; a gradient norm is the same on all);
- **metrics** go to ``metrics.jsonl``, one line per ``log_every`` steps (losses averaged over all
  processes, learning rate, validation numbers every ``eval_every`` steps when a ``validate``
  callback is given, tokens the main process has seen, with a fusion the teachers' mean weights per
  task and student layer, and every ``share_every`` steps each loss term's share of the gradient on
  the student; per student layer the std of the student's and the targets' K and V, ``kv_std``; the mean
  gradient norm before clipping and the share of steps it was clipped). A resume keeps the lines up to its
  checkpoint's step and drops a torn last line (no newline: the process was killed while appending it);
- **clipping** (``clip``): ``joint`` clips the gradient of the total loss to ``max_grad_norm``, so a large
  auxiliary term shrinks the CE step as well; ``separate`` clips the CE gradient to ``max_grad_norm`` and the
  gradient of the other terms (KV, relation, entropy) to ``kv weight x max_grad_norm`` (1 x when the KV weight
  is 0) and adds them, so a run
  with a KV term takes the same CE step as a CE-only run would from the same gradient, and the KV step is
  ``weight x clip(grad KV)``: the weight keeps its meaning (clipping the weighted gradient to ``max_grad_norm``
  would make every weight whose gradient is clipped give the same step) (one extra backward pass of CE per
  micro-batch; under data parallelism the CE part is averaged over processes like the rest; not under FSDP,
  whose gradients are sharded).
- **the final model** is saved to ``model.tmp`` and renamed to ``model``, so that a kill while it is
  written leaves no half-written ``model/`` (the next run, finding the finished checkpoint, saves it again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import Tensor
from torch.utils.data import DataLoader

from kvlib.config import TrainConfig
from kvlib.data import TASKS
from kvlib.files import write_json, write_text
from kvlib.progress import progress as progress_bar


def gradient_shares(losses: dict[str, Tensor], params: list[Tensor]) -> dict[str, float]:
    """Each loss term's gradient norm on ``params`` as a share of the sum of the norms (shares sum to 1).

    An auxiliary loss can look large and still move nothing (a public cross-model KaVa recipe: 0.22 % of
    the CE gradient at weight 1.0); the loop logs these shares so weights can be set from them.

    Pass the terms as weighted in the total loss. The graph is kept, so the total can still be
    back-propagated afterwards.
    """
    if not losses:
        raise ValueError("gradient_shares needs at least one loss term")
    norms = {}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norms[name] = torch.sqrt(sum((g.float().square().sum() for g in grads if g is not None), torch.zeros(())))
    total = float(sum(norms.values()))
    return {name: (float(n) / total if total > 0 else 0.0) for name, n in norms.items()}


def _separate_grads(accelerator, terms: dict, weights: dict, params: list, ce_sum: list | None, grad_accum: int):
    """Back-propagate the weighted non-CE terms into ``.grad`` and add this micro-batch's CE gradient to
    ``ce_sum`` (one tensor per parameter, the CE gradient kept apart until the optimizer step). The non-CE
    part is summed from its terms, not taken as ``loss - ce``, whose graph would run through CE's twice.
    With no non-CE term of weight > 0 (a KV weight of 0 and no relation or entropy term) nothing is
    back-propagated: ``.grad`` stays empty, so the non-CE norm is 0 and the step is the CE step alone."""
    ce = torch.autograd.grad(terms["ce"] / grad_accum, params, retain_graph=True, allow_unused=True)
    ce = [torch.zeros_like(p) if g is None else g for p, g in zip(params, ce)]
    aux = [w * terms[n] for n, w in weights.items() if n != "ce" and n in terms and w > 0]
    if aux:
        accelerator.backward(sum(aux))
    return ce if ce_sum is None else [a + b for a, b in zip(ce_sum, ce)]


def _clip_separately(accelerator, params: list, ce_sum: list, max_norm: float, aux_max_norm: float):
    """Clip the CE gradient ``ce_sum`` to ``max_norm`` and the non-CE gradient in ``.grad`` to ``aux_max_norm``,
    add the CE part to ``.grad``; returns both norms before clipping. The CE part is averaged over processes
    first."""
    aux = float(accelerator.clip_grad_norm_(params, aux_max_norm))
    flat = torch.cat([g.flatten() for g in ce_sum])
    if accelerator.num_processes > 1:
        flat = accelerator.reduce(flat, reduction="mean")
    norm = float(flat.norm())
    scale = min(1.0, max_norm / (norm + 1e-6))
    start = 0
    for p in params:
        g = flat[start : start + p.numel()].view_as(p).to(p.dtype) * scale
        start += p.numel()
        p.grad = g if p.grad is None else p.grad + g
    return norm, aux


def _norm_summary(norms: dict[str, list[float]], max_norm: float) -> dict:
    """Mean pre-clip gradient norm per clipped part (``""``: joint) over a log window and its share clipped."""
    row = {}
    for name, values in norms.items():
        suffix = f"_{name}" if name else ""
        row[f"grad_norm{suffix}"] = sum(values) / len(values)
        row[f"clipped{suffix}"] = sum(v > max_norm for v in values) / len(values)
    return row


def _scale_summary(mean: Tensor) -> dict[str, list[float]]:
    """``kv_std`` (Ls, 2 or 4) averaged over a window as lists per student layer."""
    names = ("student_k", "student_v", "target_k", "target_v")[: mean.shape[1]]
    return {name: mean[:, j].tolist() for j, name in enumerate(names)}


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0.1 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _aside(folder: Path) -> tuple[Path, Path]:
    """The checkpoint being written (``.tmp``) and the previous one while it is replaced (``.old``)."""
    return folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")


def _recover_checkpoint(folder: Path) -> None:
    """Repair what a kill inside ``_save_checkpoint`` left next to ``folder``: when ``folder`` is missing but
    ``.old`` is complete (killed between the two renames), put it back; remove a stale ``.old`` next to a
    complete ``folder`` and any ``.tmp`` (a checkpoint not finished, or finished but not renamed)."""
    tmp, old = _aside(folder)
    if not (folder / "state.json").exists() and (old / "state.json").exists():
        os.replace(old, folder)
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)


def _save_checkpoint(accelerator: Accelerator, folder: Path, state: dict) -> None:
    """Write a checkpoint to ``.tmp`` (``state.json`` last, atomically), then swap it in; every point at which
    a kill can stop this sequence is repaired by ``_recover_checkpoint``."""
    tmp, old = _aside(folder)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "state.json", state)
        if folder.exists():
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    accelerator.wait_for_everyone()


def check_validation(distributed_type: DistributedType, validating: bool) -> None:
    """Validation generates with the student on the main process alone, which FSDP cannot do: its sharded
    parameters are gathered only when every process runs the wrapped model together."""
    if validating and distributed_type == DistributedType.FSDP:
        raise ValueError(
            "validation during training (eval_every > 0) is not supported under FSDP; set eval_every: 0 in the "
            "student's train section (the evaluate stage measures accuracy after training)"
        )


def _flatten(tree, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and other values are leaves)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix.removesuffix("."): tree}
    return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


def _check_fingerprint(saved: dict, fingerprint: dict, checkpoint: Path) -> None:
    """Refuse to resume from ``checkpoint``, whose ``state.json`` is ``saved``, with another ``fingerprint``
    (a JSON-able dict; its SHA-256 is compared), naming the keys that differ."""
    if saved.get("fingerprint_sha256") == _fingerprint_sha256(fingerprint):
        return
    old, new = _flatten(saved.get("fingerprint", {})), _flatten(json.loads(json.dumps(fingerprint)))

    def show(tree: dict, key: str) -> str:
        return json.dumps(tree[key]) if key in tree else "absent"

    differ = [
        f"{k}: {show(old, k)} -> {show(new, k)}"
        for k in sorted(old.keys() | new.keys())
        if show(old, k) != show(new, k)
    ]
    raise ValueError(
        f"{checkpoint} was written by another configuration ({'; '.join(differ)}); delete {checkpoint.parent} "
        "to train afresh, or restore the params that produced it"
    )


def _fingerprint_sha256(fingerprint: dict) -> str:
    """SHA-256 (hex) of ``fingerprint`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode("utf-8")).hexdigest()


def _check_no_pickle(checkpoint: Path) -> None:
    """``accelerate.load_state`` would unpickle ``custom_checkpoint_*.pkl`` with ``weights_only=False`` (code
    runs); kvlib registers no such object and never writes one, so a checkpoint holding one is refused."""
    planted = sorted(p.name for p in checkpoint.glob("custom_checkpoint_*.pkl"))
    if planted:
        raise ValueError(
            f"{checkpoint} holds {planted}, which kvlib never writes (loading a pickle can run code); remove them "
            f"and resume, or delete {checkpoint.parent} to train afresh"
        )


def _metrics_until(text: str, step: int) -> str:
    """The lines of a ``metrics.jsonl`` text logged at steps <= ``step``; a torn last line (no newline: the
    process was killed while appending it) is dropped."""
    lines = text.split("\n")[:-1]  # the part after the last newline is empty or torn
    return "".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= step)


def _non_finite_message(term: str, value: float, step: int, saved: int, cfg: TrainConfig, mixed: str) -> str:
    """Why training stopped at optimizer ``step``: ``term`` is ``value``; the last checkpoint is at ``saved``."""
    kept = f"the checkpoint of step {saved} is kept" if saved else "no checkpoint was written"
    return (
        f"{term} is {value} at step {step}; training stopped before updating the parameters with it and {kept}. "
        f"Likely causes: a learning rate too high (lr={cfg.lr}), non-finite teacher KV in a store (re-run the "
        f"teacher_kv stage), or an fp16 overflow (mixed_precision={mixed}; bf16 has float32's range)"
    )


def _mean_over_processes(accelerator: Accelerator, sums: dict[str, float], count: int) -> dict[str, float]:
    """Each logged term's mean over the ``count`` micro-batches of every process (all processes call this)."""
    names = sorted(sums)
    totals = torch.tensor([sums[n] for n in names], dtype=torch.float64, device=accelerator.device)
    means = accelerator.reduce(totals, reduction="mean") / count
    return {name: float(value) for name, value in zip(names, means)}


def train(
    distiller: torch.nn.Module,
    collate: Callable[[Sequence[int]], dict],
    num_examples: int,
    cfg: TrainConfig,
    out_dir: str | Path,
    stop_at: int | None = None,
    progress: bool = True,
    validate: Callable[[], dict] | None = None,
    fingerprint: dict | None = None,
) -> dict:
    """Train ``distiller`` on examples ``0 .. num_examples - 1``, batched by ``collate(indices)``.

    ``validate()`` (e.g. validation accuracy by greedy decoding) runs on the main process every
    ``cfg.eval_every`` steps and at the end; its numbers are logged with a ``val_`` prefix.
    ``fingerprint``: a JSON-able description of what besides ``cfg`` determines the run (model params,
    group, seed, data); a checkpoint in ``out_dir`` written with another ``cfg`` or ``fingerprint`` is
    refused (ValueError). A non-finite loss term or gradient norm raises ``FloatingPointError``.

    Writes ``metrics.jsonl``, ``checkpoint/`` and, when all ``cfg.steps`` are done, ``model/`` (the
    student, ``save_pretrained``, gathered from all processes under FSDP) and ``summary.json``. Returns the
    summary (or the progress so far when stopped early by ``stop_at``).
    """
    micro_batch = cfg.batch_size
    if num_examples < micro_batch:
        raise ValueError(f"{num_examples} training examples are fewer than one batch of {micro_batch}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mixed = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if torch.cuda.is_available() else "no")
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed)
    check_validation(accelerator.distributed_type, validate is not None and cfg.eval_every > 0)
    set_seed(cfg.seed)
    decay = [p for n, p in distiller.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in distiller.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps))
    if cfg.clip == "separate" and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("clip 'separate' needs whole gradients, which FSDP shards; use clip 'joint' under FSDP")
    model, optimizer = accelerator.prepare(distiller, optimizer)
    student_params = [p for p in accelerator.unwrap_model(model).student.parameters() if p.requires_grad]
    weights = accelerator.unwrap_model(model).term_weights()
    separate = cfg.clip == "separate" and len(weights) > 1  # CE only: one term, nothing to separate
    aux_max_norm = cfg.max_grad_norm * (weights.get("kv") or 1.0)  # the KV step: weight x clip(grad KV)
    trainable = [p for p in model.parameters() if p.requires_grad]

    checkpoint, metrics_path = out / "checkpoint", out / "metrics.jsonl"
    run = {"train": dataclasses.asdict(cfg), "run": fingerprint}
    identity = {"fingerprint": run, "fingerprint_sha256": _fingerprint_sha256(run)}
    if accelerator.is_main_process:
        _recover_checkpoint(checkpoint)
    accelerator.wait_for_everyone()
    step, tokens = 0, 0
    if (checkpoint / "state.json").exists():
        state = json.loads((checkpoint / "state.json").read_text())
        _check_fingerprint(state, run, checkpoint)
        _check_no_pickle(checkpoint)
        accelerator.load_state(str(checkpoint))
        scheduler.load_state_dict(state["scheduler"])
        step, tokens = state["step"], state["tokens"]
    saved = step
    if accelerator.is_main_process:  # drop log lines written after the checkpoint we resume from
        kept = _metrics_until(metrics_path.read_text(), step) if step and metrics_path.exists() else ""
        write_text(metrics_path, kept)

    def loader(epoch: int) -> DataLoader:
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        dl = DataLoader(range(num_examples), micro_batch, shuffle=True, generator=g, drop_last=True, collate_fn=collate)
        return accelerator.prepare_data_loader(dl, device_placement=True)

    per_epoch = len(loader(0))
    consumed = step * cfg.grad_accum
    epoch, skip = divmod(consumed, per_epoch)
    bar = progress_bar(
        total=cfg.steps,
        initial=step,
        disable=not (progress and accelerator.is_main_process),
        desc="train",
        mininterval=2,
    )
    sums, count, shares, t0 = {}, 0, None, time.perf_counter()
    scale_sum, window, norms, ce_sum = None, 0, {}, None  # kv_std summed over the log window; pre-clip norms
    routed, routed_n = {}, {}  # per task: summed fusion weights (Ls, N) and example counts
    model.train()
    while step < cfg.steps and (stop_at is None or step < stop_at):
        dl = loader(epoch)
        if skip:
            dl, skip = accelerator.skip_first_batches(dl, skip), 0
        for batch in dl:
            with accelerator.accumulate(model):
                terms = model(batch)
                fusion_weights = terms.pop("fusion_weights", None)  # (Ls, B, N)
                kv_std = terms.pop("kv_std", None)  # (Ls, 2 or 4)
                if kv_std is not None:
                    scale_sum, window = (kv_std if scale_sum is None else scale_sum + kv_std), window + 1
                values = {name: float(value.detach()) for name, value in terms.items()}
                for name, value in values.items():
                    if not math.isfinite(value):
                        raise FloatingPointError(_non_finite_message(name, value, step + 1, saved, cfg, mixed))
                if cfg.share_every and (step + 1) % cfg.share_every == 0 and count == 0:
                    shares = gradient_shares(
                        {n: weights[n] * terms[n] for n in weights if n in terms and weights[n] > 0}, student_params
                    )
                if separate:
                    ce_sum = _separate_grads(accelerator, terms, weights, trainable, ce_sum, cfg.grad_accum)
                else:
                    accelerator.backward(terms["loss"])
                if accelerator.sync_gradients:
                    if separate:
                        clipped = _clip_separately(accelerator, trainable, ce_sum, cfg.max_grad_norm, aux_max_norm)
                        step_norms = dict(zip(("ce", "aux"), clipped))
                        ce_sum = None
                    else:
                        name = "ce" if cfg.clip == "separate" else ""  # CE only: its norm is the CE norm
                        step_norms = {name: float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))}
                    for name, norm in step_norms.items():
                        if accelerator.scaler is None and not math.isfinite(norm):
                            raise FloatingPointError(
                                _non_finite_message(
                                    f"gradient norm{' of ' + name if name else ''}", norm, step + 1, saved, cfg, mixed
                                )
                            )
                        norms.setdefault(name, []).append(norm)
                optimizer.step()
                optimizer.zero_grad()
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value
            count += 1
            tokens += int(batch["attention_mask"].sum())
            if fusion_weights is not None:
                for k, task in enumerate(TASKS):
                    sel = batch["task_ids"] == k
                    routed[task] = routed.get(task, 0) + fusion_weights[:, sel].sum(1).cpu()
                    routed_n[task] = routed_n.get(task, 0) + int(sel.sum())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            bar.update(1)
            evaluating = validate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
            if step % cfg.log_every == 0 or step == cfg.steps or evaluating:
                row = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], "tokens": tokens}
                row |= _mean_over_processes(accelerator, sums, count)
                if evaluating and accelerator.is_main_process:
                    row |= {f"val_{name}": value for name, value in validate().items()}
                    model.train()
                if shares is not None:
                    row["grad_share"] = shares
                if routed:
                    row["fusion_weights"] = {t: (w / max(routed_n[t], 1)).tolist() for t, w in routed.items()}
                routed, routed_n = {}, {}
                row |= _norm_summary(norms, cfg.max_grad_norm)
                if scale_sum is not None:
                    row["kv_std"] = _scale_summary(scale_sum / window)
                scale_sum, norms, window = None, {}, 0
                row["seconds"] = round(time.perf_counter() - t0, 3)
                bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "ce", "kv") if k in row})
                if accelerator.is_main_process:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                shares = None
            sums, count = {}, 0
            if step % cfg.save_every == 0 or step == cfg.steps or step == stop_at:
                record = {"step": step, "tokens": tokens, "scheduler": scheduler.state_dict()} | identity
                _save_checkpoint(accelerator, checkpoint, record)
                saved = step
            if step >= cfg.steps or step == stop_at:
                break
        epoch += 1
    bar.close()
    examples_per_step = micro_batch * cfg.grad_accum * accelerator.num_processes
    summary = {"steps": step, "finished": step >= cfg.steps, "examples_per_step": examples_per_step}
    if step >= cfg.steps:
        state = accelerator.get_state_dict(model)  # full parameters, gathered from FSDP shards by every process
    if step >= cfg.steps and accelerator.is_main_process:
        student = {name.removeprefix("student."): t for name, t in state.items() if name.startswith("student.")}
        final, staging = out / "model", out / "model.tmp"  # a reader never sees a half-written model/
        shutil.rmtree(staging, ignore_errors=True)
        accelerator.unwrap_model(model).student.save_pretrained(staging, state_dict=student)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
        summary |= {"final": rows[-1] if rows else {}}
        write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary
