"""Data parallelism on CPU: two processes (torchrun, gloo) end with the parameters of one process that
takes both halves of each batch (REFERENCE.md: ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2).

The runs train in float64, so that they differ only by the order of float64 reductions (one process sums
a gradient over the whole batch, two sum halves and average them); the tolerance is derived from that
error below, and a run one optimizer step shorter is shown to exceed it. With ``clip: separate`` the runs
add an auxiliary term (an L2 penalty on the student, weight 1: a gradient of its own, clipped apart from
CE's), so the CE gradient kept apart from ``.grad`` must be averaged over the processes like the rest."""

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from kvlib.train import warmup_cosine

STEPS, LR, MAX_GRAD_NORM, WARMUP, BATCH, TOKENS = 3, 1e-2, 1.0, 1, 8, 40

SCRIPT = textwrap.dedent(
    f"""
    import sys
    from pathlib import Path

    import torch

    from kvlib.config import ModelShape, TrainConfig
    from kvlib.data import generate
    from kvlib.batches import collate_fn
    from kvlib.distill import Distiller
    from kvlib.text import train_tokenizer
    from kvlib.train import train

    out, batch, steps, clip = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]


    class WithPenalty(Distiller):  # CE plus a second term, so that clip 'separate' has two parts to clip
        def forward(self, batch):
            terms = super().forward(batch)
            terms["kv"] = sum(p.square().sum() for p in self.student.parameters()) / 100
            terms["loss"] = terms["ce"] + terms["kv"]
            return terms

        def term_weights(self):
            return {{"ce": 1.0, "kv": 1.0}}

    torch.set_num_threads(1)
    examples = generate(32, seed=0, max_operand=9)
    tokenizer = train_tokenizer("char", [e.text for e in examples])
    encode = collate_fn(tokenizer, examples)


    def collate(indices):  # no padding, so every process's mean CE is over the same number of tokens
        b = encode(indices)
        return {{k: v[:, :{TOKENS}] if k in ("input_ids", "attention_mask") else v for k, v in b.items()}}


    model = ModelShape("llama", 2, 4, 2, 8, 32).build(len(tokenizer), seed=0).to(torch.float64)
    cfg = TrainConfig(
        steps=steps, batch_size=batch, lr={LR}, warmup_steps={WARMUP}, max_grad_norm={MAX_GRAD_NORM}, log_every=1,
        save_every=100, share_every=0, clip=clip,
    )
    module = WithPenalty(model) if clip == "separate" else Distiller(model)
    train(module, collate, len(examples), cfg, out, progress=False)
    """
)


def reduction_order_tolerance(parts: int) -> float:
    """Bound on the parameter difference two float64 runs can reach by summing in another order.

    Each gradient element is a sum over the batch's ``n`` predicted tokens, so the two runs' gradients
    differ by at most ``2 n u`` (u: float64's unit roundoff) of their scale, at most ``max_grad_norm``
    after clipping, or ``parts`` times that when the parts are clipped apart;
    AdamW divides by ``sqrt(v) + eps``, which amplifies a difference by at most ``1 / eps``,
    and step ``t`` moves the parameters by ``lr_t`` times that."""
    u = torch.finfo(torch.float64).eps / 2
    eps = inspect.signature(torch.optim.AdamW).parameters["eps"].default
    n = BATCH * (TOKENS - 1)
    lrs = [LR * warmup_cosine(WARMUP, STEPS)(t) for t in range(STEPS)]
    return 2 * n * u * parts * MAX_GRAD_NORM / eps * sum(lrs)


@pytest.mark.parametrize("clip", ["joint", "separate"])
def test_two_processes_end_where_one_process_with_the_whole_batch_does(tmp_path, clip):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    half, steps = str(BATCH // 2), str(STEPS)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one"), str(BATCH), steps, clip], check=True, env=env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    two = [*torchrun, str(script), str(tmp_path / "two"), half, steps, clip]
    subprocess.run(two, check=True, env=env, timeout=600)
    short = [sys.executable, str(script), str(tmp_path / "short"), str(BATCH), str(STEPS - 1), clip]
    subprocess.run(short, check=True, env=env)
    one, two, short = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("one", "two", "short"))
    atol = reduction_order_tolerance(2 if clip == "separate" else 1)
    assert one.keys() == two.keys() and all(t.dtype == torch.float64 for t in one.values())
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=atol, rtol=0)
    assert max((short[name] - one[name]).abs().max() for name in one) > atol  # one step fewer is caught
