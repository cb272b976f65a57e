"""Train one student as a script, so that ``accelerate launch``, ``torchrun`` or SLURM's ``srun`` start it
on one or many GPUs and nodes:

    accelerate launch --config_file params/accelerate/multi_gpu.yaml -m kvlib.launch \\
        --params params/real_qwen2_tinyllama.yaml --group G1 --seed 0

The script reads the ``train`` section of a params file (the parameters of ``notebooks/05_train.ipynb``)
and trains student ``<group>/<seed>`` into ``out_root`` as the notebook does in its own kernel. When
that section sets ``launch``, a command prefix such as ``accelerate launch --config_file
params/accelerate/multi_gpu.yaml``, the notebook runs this script under it instead (``run_train``), so
that ``dvc repro`` scales out from the params alone. Relative paths are taken from the project root.
``batch_size`` is per process: N processes train on N times as many examples per step.

Without a launcher, ``train_group`` trains a group's seeds ``workers`` at a time in spawned processes of
``threads`` threads each. One stage per group instead of per seed saves a stage's start-up (~19 s: DVC, kernel,
HTML export) per seed. What two 1-thread processes side by side gain over one 2-thread process depends on the
model: measured on 2 cores, 1.0-1.4x for the default student (250 steps: 35-47 s side by side against 22-26 s
alone, CE only), and 1.6x for the latent student's KaVa steps.

A launcher naming an accelerate ``--config_file`` is checked before it starts (``check_launch``): a GPU
config (``GPU_TYPES``, not ``use_cpu`` or ``--cpu``) that starts more processes per machine
(``num_processes / num_machines``, or ``--num_processes`` / ``--num_machines`` of the prefix) than this
machine has GPUs is refused: on a machine without GPUs each process would act as the main one and they
would race on the same checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from kvlib import project_root
from kvlib.config import load_params
from kvlib.files import write_text
from kvlib.processes import check_workers, side_by_side
from kvlib.student import train_student
from kvlib.tuning import resolve_group

GPU_TYPES = ("MULTI_GPU", "FSDP", "DEEPSPEED", "MEGATRON_LM")  # accelerate distributed types with a process per GPU


def student_dir(parameters: dict, group: str, seed: int) -> Path:
    """Where student ``<group>/<seed>`` is trained: ``out_root/<group>/<seed>`` under the project root."""
    return project_root() / parameters["out_root"] / group / str(seed)


def train_here(parameters: dict, group: str, seed: int, progress: bool = True) -> dict:
    """Train student ``<group>/<seed>`` in this process (one of several under a launcher); returns its summary.
    A group tuned by a family (``kvlib.tuning``) takes the choice recorded in the file ``tuning`` names."""
    root = project_root()
    tuning = parameters.get("tuning") or ""
    choices = json.loads((root / tuning).read_text()) if tuning and (root / tuning).is_file() else None
    settings = resolve_group(parameters["groups"], group, choices)
    torch.set_num_threads(parameters["threads"])
    alignment = root / parameters["alignment_dir"]
    return train_student(
        parameters["student"],
        settings,
        seed,
        root / parameters["data_dir"],
        student_dir(parameters, group, seed),
        root / parameters["kv_root"],
        alignment if alignment.exists() else None,
        progress,
        parameters["store_cache_mib"] * 2**20 or None,  # 0: every shard read stays in memory
    )


def check_launch(launch: str) -> None:
    """Refuse a launcher prefix whose accelerate ``--config_file`` (taken from the project root) starts more
    GPU processes per machine than this machine has GPUs (``torch.cuda.device_count()``)."""
    options = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    options.add_argument("--config_file")
    options.add_argument("--num_processes", type=int)
    options.add_argument("--num_machines", type=int)
    options.add_argument("--cpu", action="store_true")
    args, _ = options.parse_known_args(shlex.split(launch))
    if args.config_file is None:
        return
    path = project_root() / args.config_file
    if not path.is_file():
        raise ValueError(f"launch {launch!r} names --config_file {args.config_file}, which is not in {project_root()}")
    config = yaml.safe_load(path.read_text())
    processes = args.num_processes or config.get("num_processes", 1)  # absent: accelerate picks, at least 1
    per_machine = processes // (args.num_machines or config.get("num_machines", 1))
    gpus = torch.cuda.device_count()
    on_gpu = config.get("distributed_type") in GPU_TYPES and not (config.get("use_cpu") or args.cpu)
    if on_gpu and per_machine > gpus:
        fix = "set train.launch to '' (train in the notebook's kernel)"
        fix += f" or add --num_processes {gpus} to it" if gpus else " on a machine without GPUs"
        raise ValueError(
            f"launch {launch!r} starts {per_machine} {config['distributed_type']} processes per machine but this "
            f"machine has {gpus} GPU(s); {fix}"
        )


def run_train(parameters: dict, group: str, seed: int, progress: bool = True) -> dict:
    """Train student ``<group>/<seed>``: in this process, or, when ``parameters["launch"]`` holds a launcher
    command prefix (checked by ``check_launch``), in the processes that launcher starts; returns the training
    summary."""
    launch = parameters.get("launch") or ""
    if not launch:
        return train_here(parameters, group, seed, progress)
    check_launch(launch)
    out = student_dir(parameters, group, seed)
    out.mkdir(parents=True, exist_ok=True)
    params_file = out / "launch.yaml"  # in the project, so that every node of a cluster job reads it
    write_text(params_file, yaml.safe_dump({"train": {**parameters, "launch": ""}}))
    command = [*shlex.split(launch), "-m", "kvlib.launch", "--params", str(params_file)]
    command += ["--group", group, "--seed", str(seed)]
    print(f"[kvlib] {shlex.join(command)}", flush=True)
    try:
        subprocess.run(command, check=True, cwd=project_root())
    except FileNotFoundError as e:
        raise ValueError(f"launch command {launch!r} names no program on PATH ({e.filename})") from e
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"training under {launch!r} failed with exit status {e.returncode}") from e
    finally:
        params_file.unlink()
    return json.loads((out / "summary.json").read_text())


def train_group(parameters: dict, group: str, seeds: list[int], progress: bool = True) -> dict[int, dict]:
    """Train the students ``<group>/<seed>`` of ``seeds``; seed -> training summary. Under a launcher
    (``parameters["launch"]``) they train one after another (``run_train``); without one,
    ``parameters["workers"]`` at a time, each in a spawned process of its own with ``threads`` torch threads
    (a worker's result does not depend on which seeds run beside it; 1 worker: one after another in this
    process, with progress bars). A failed seed raises once every seed has ended; the others keep their folders."""
    workers = parameters.get("workers", 1)
    check_workers(workers)
    if parameters.get("launch") or min(workers, len(seeds)) == 1:
        return {s: run_train(parameters, group, s, progress) for s in seeds}
    jobs = {s: {"parameters": parameters, "group": group, "seed": s, "progress": False} for s in seeds}
    return side_by_side(train_here, jobs, workers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="a params file; its section `train` is read")
    parser.add_argument("--group", required=True)
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if "train" not in params:
        raise ValueError(f"{args.params} has no section 'train'; its sections: {sorted(params)}")
    train_here(params["train"], args.group, args.seed)


if __name__ == "__main__":
    sys.exit(main())
