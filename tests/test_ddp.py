"""Data parallelism on CPU: two processes (torchrun, gloo) end with the parameters of one process that
takes both halves of each batch (REFERENCE.md: ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2)."""

import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    from kvlib.config import ModelShape, TrainConfig
    from kvlib.data import generate
    from kvlib.distill import Distiller, collate_fn
    from kvlib.text import train_tokenizer
    from kvlib.train import train

    out, batch = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    examples = generate(32, seed=0, max_operand=9)
    tokenizer = train_tokenizer("char", [e.text for e in examples])
    encode = collate_fn(tokenizer, examples)


    def collate(indices):  # no padding, so every process's mean CE is over the same number of tokens
        b = encode(indices)
        return {k: v[:, :40] if k in ("input_ids", "attention_mask") else v for k, v in b.items()}


    model = ModelShape("llama", 2, 4, 2, 8, 32).build(len(tokenizer), seed=0)
    cfg = TrainConfig(steps=3, batch_size=batch, lr=1e-2, warmup_steps=1, log_every=1, save_every=100, share_every=0)
    train(Distiller(model), collate, len(examples), cfg, out, progress=False)
    """
)


def test_two_processes_end_where_one_process_with_the_whole_batch_does(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "8"], check=True, env=env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    subprocess.run([*torchrun, str(script), str(tmp_path / "two"), "4"], check=True, env=env, timeout=600)
    subprocess.run([sys.executable, str(script), str(tmp_path / "half"), "4"], check=True, env=env)
    one, two, half = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("one", "two", "half"))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-5)
    assert not all(torch.allclose(half[name], one[name], atol=1e-4) for name in one)  # the batch size matters
