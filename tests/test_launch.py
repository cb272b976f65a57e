"""Scale-out: the committed accelerate configs, and the train stage run by a launcher in several processes."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from accelerate.utils.launch import prepare_multi_gpu_env
from safetensors.torch import load_file
from tiny import tiny

from kvlib import project_root
from kvlib.config import load_params
from kvlib.data import prepare_data
from kvlib.distill import Distiller
from kvlib.launch import check_launch, main, run_train, train_group
from kvlib.models import load_model
from kvlib.teacher import train_teacher
from kvlib.teacher_kv import extract_teacher_kv

CONFIGS = project_root() / "params" / "accelerate"
# config -> (distributed type, processes, machines)
EXPECTED = {
    "single_gpu": ("NO", 1, 1),
    "multi_gpu": ("MULTI_GPU", 8, 1),
    "fsdp": ("FSDP", 8, 1),
    "multi_node": ("MULTI_GPU", 16, 2),
}


def launch_args(config: str):
    """What ``accelerate launch --config_file <config> -m kvlib.launch`` resolves (no process is started)."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(CONFIGS / f"{config}.yaml"), "-m", "kvlib.launch", "--params", "p"])
    return _validate_launch_command(args)[0]


def test_the_slurm_wrapper_gives_each_node_its_rank_and_the_head_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"scontrol": 'printf "gpu-017\\ngpu-018\\n"', "accelerate": 'echo "$@"'}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "gpu-[017-018]", "SLURM_NNODES": "2"}
    env |= {"SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "8"}
    script = CONFIGS / "slurm.sh"
    out = subprocess.run(["bash", str(script), "-m", "kvlib.launch", "--group", "G1"], env=env, capture_output=True)
    assert out.returncode == 0, out.stderr
    args = out.stdout.decode().split()
    assert args[:2] == ["launch", "--config_file"] and Path(args[2]) == CONFIGS / "multi_node.yaml"
    options = dict(zip(args[3:13:2], args[4:13:2]))
    assert options == {
        "--num_machines": "2",
        "--num_processes": "16",
        "--machine_rank": "1",
        "--main_process_ip": "gpu-017",
        "--main_process_port": "29500",
    }
    assert args[13:] == ["-m", "kvlib.launch", "--group", "G1"]


def test_every_config_is_committed_and_tested():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    assert sorted(p.name for p in CONFIGS.iterdir()) == sorted([*(f"{c}.yaml" for c in EXPECTED), "slurm.sh"])


@pytest.mark.parametrize("config", EXPECTED)
def test_accelerate_reads_each_config_as_intended(config):
    kind, processes, machines = EXPECTED[config]
    cfg = load_config_from_file(str(CONFIGS / f"{config}.yaml"))
    assert (cfg.distributed_type.value, cfg.num_processes, cfg.num_machines) == (kind, processes, machines)
    assert cfg.mixed_precision == "bf16" and not cfg.use_cpu
    args = launch_args(config)
    assert (args.num_processes, args.num_machines, args.mixed_precision) == (processes, machines, "bf16")
    assert args.multi_gpu == (kind == "MULTI_GPU") and args.use_fsdp == (kind == "FSDP")


def test_fsdp_shards_each_decoder_block_of_the_student(monkeypatch):
    env = prepare_multi_gpu_env(launch_args("fsdp"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    distiller = Distiller(tiny("llama-gqa"))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, distiller)
    wrapped = {type(m).__name__ for m in distiller.modules() if policy(m)}
    assert wrapped == {"LlamaDecoderLayer"}


def test_launch_prefixes_in_the_params_name_committed_configs():
    for params_file in sorted((project_root() / "params").glob("*.yaml")):
        launch = shlex.split(load_params(params_file)["train"]["launch"])
        if "--config_file" in launch:
            assert (project_root() / launch[launch.index("--config_file") + 1]).exists(), params_file.name


SIZES = {"teacher_train": 16, "student_train": 16, "validation": 0, "test": 2}
TRAIN = {"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "save_every": 10, "share_every": 0}
SHAPE = {"family": "llama", "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "hidden_size": 32}


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """The train section of a params file (absolute paths) over two teachers' KV stores."""
    root = tmp_path_factory.mktemp("launch")
    prepare_data(SIZES, seed=0, max_operand=9, out_dir=root / "data")
    for name, family in (("A", "qwen2"), ("B", "mistral")):
        teacher = {
            "shape": {**SHAPE, "family": family},
            "tokenizer": {"kind": "char", "vocab_size": None},
            "train": TRAIN,
        }
        train_teacher(teacher | {"max_new_tokens": 4}, root / "data", root / "teacher" / name, progress=False)
        extract_teacher_kv(root / "teacher" / name, root / "data", root / "kv" / name, progress=False)
    student = {"shape": SHAPE, "tokenizer": {"kind": "bpe", "vocab_size": 280}, "train": TRAIN, "max_new_tokens": 4}
    routed = {"teachers": ["A", "B"], "kv": {"weight": 0.5}, "fusion": {"kind": "router", "entropy_weight": 0.01}}
    return {
        "student": student,
        "groups": {"G0": {"teachers": []}, "R": routed},
        "data_dir": str(root / "data"),
        "kv_root": str(root / "kv"),
        "store_cache_mib": 0,
        "alignment_dir": str(root / "alignment"),
        "out_root": str(root / "students"),
        "threads": 1,
        "launch": "",
    }


def test_two_launched_processes_train_one_routed_student(stage, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # REFERENCE.md: CPU data parallelism via torchrun
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torchrun = f"{shlex.quote(sys.executable)} -m torch.distributed.run --nproc_per_node 2"
    student = stage["student"] | {"train": TRAIN | {"share_every": 1}}  # gradient shares under DDP too
    summary = run_train(stage | {"launch": torchrun, "student": student}, "R", 3, progress=False)
    assert summary["finished"] and summary["seed"] == 3
    assert summary["examples_per_step"] == 2 * TRAIN["batch_size"]  # per process x processes
    out = project_root() / stage["out_root"] / "R" / "3"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # one writer
    assert all({"ce", "kv", "entropy", "fusion_weights", "grad_share"} <= set(r) for r in rows)
    student = load_model(out / "model")
    assert student.config.num_hidden_layers == SHAPE["num_layers"]
    assert sorted(os.listdir(out)) == ["checkpoint", "metrics.jsonl", "model", "summary.json", "tokenizer"]


def test_the_script_trains_the_group_named(stage, tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"train": stage}))
    main(["--params", str(params_file), "--group", "G0", "--seed", "1"])
    summary = json.loads((project_root() / stage["out_root"] / "G0" / "1" / "summary.json").read_text())
    assert summary["finished"] and summary["teachers"] == [] and summary["examples_per_step"] == 4


def test_seeds_trained_side_by_side_equal_the_same_seeds_trained_one_after_another(stage, tmp_path):
    threads = torch.get_num_threads()
    try:  # workers 1 trains here, setting this process's threads to the stage's
        runs = {
            workers: train_group(
                stage | {"workers": workers, "out_root": str(tmp_path / str(workers))}, "R", [0, 1], False
            )
            for workers in (2, 1)
        }
    finally:
        torch.set_num_threads(threads)
    assert list(runs[2]) == [0, 1] and [s["seed"] for s in runs[2].values()] == [0, 1]
    weights = {}
    for workers in (2, 1):
        for seed in (0, 1):
            out = tmp_path / str(workers) / "R" / str(seed)
            weights[workers, seed] = load_file(out / "model" / "model.safetensors")
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            weights[workers, seed, "ce"] = [r["ce"] for r in rows]
    for seed in (0, 1):  # one thread each: the same arithmetic in a worker process as here, bit for bit
        assert weights[2, seed, "ce"] == weights[1, seed, "ce"]
        assert all(torch.equal(w, weights[1, seed][k]) for k, w in weights[2, seed].items())
    assert not torch.equal(weights[1, 0]["lm_head.weight"], weights[1, 1]["lm_head.weight"])  # two seeds, two students


def test_bad_workers_and_a_failed_worker_are_named(stage):
    with pytest.raises(ValueError, match=r"workers=0 must be an integer >= 1"):
        train_group(stage | {"workers": 0}, "G0", [0, 1])
    with pytest.raises(ValueError, match="group 'G9' is not among"):  # raised in a worker, re-raised here
        train_group(stage | {"workers": 2}, "G9", [0, 1], False)


def test_bad_launches_are_named(stage, tmp_path):
    with pytest.raises(ValueError, match="group 'G9' is not among"):
        run_train(stage, "G9", 0)
    with pytest.raises(ValueError, match="names no program"):
        run_train(stage | {"launch": "no-such-launcher --x"}, "G0", 0)
    with pytest.raises(RuntimeError, match="failed with exit status"):
        run_train(stage | {"launch": f"{sys.executable} -c 'import sys; sys.exit(3)'"}, "G0", 0)
    (tmp_path / "p.yaml").write_text("data: {}\n")
    with pytest.raises(ValueError, match="has no section 'train'"):
        main(["--params", str(tmp_path / "p.yaml"), "--group", "G0", "--seed", "0"])


def accelerate(config: str, *options: str) -> str:
    return shlex.join(["accelerate", "launch", "--config_file", f"params/accelerate/{config}.yaml", *options])


@pytest.mark.parametrize(
    ("launch", "gpus", "message"),
    [
        (accelerate("multi_gpu"), 0, r"starts 8 MULTI_GPU processes per machine but this machine has 0 GPU\(s\); "),
        (accelerate("fsdp"), 1, r"starts 8 FSDP processes .* has 1 GPU\(s\); .* or add --num_processes 1 to it"),
        (accelerate("multi_node"), 4, r"starts 8 MULTI_GPU processes per machine but this machine has 4 GPU"),
        (accelerate("multi_gpu", "--num_processes", "4"), 2, r"starts 4 MULTI_GPU processes per machine"),
    ],
)
def test_a_gpu_launch_config_for_more_gpus_than_the_machine_has_is_refused(monkeypatch, launch, gpus, message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(ValueError, match=message):
        check_launch(launch)


@pytest.mark.parametrize(
    ("launch", "gpus"),
    [
        (accelerate("multi_gpu"), 8),
        (accelerate("multi_node"), 8),  # 16 processes over 2 machines
        (accelerate("fsdp", "--num_processes", "2"), 2),
        (accelerate("single_gpu"), 0),  # one process: accelerate falls back to the CPU
        (accelerate("multi_gpu", "--cpu"), 0),
        (f"{sys.executable} -m torch.distributed.run --nproc_per_node 2", 0),  # no accelerate config
    ],
)
def test_a_launch_that_fits_the_machine_is_accepted(monkeypatch, launch, gpus):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    check_launch(launch)


def test_a_refused_launch_starts_nothing_and_creates_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    parameters = {"launch": accelerate("multi_gpu"), "out_root": str(tmp_path / "students")}
    with pytest.raises(ValueError, match=r"set train.launch to '' \(train in the notebook's kernel\) on a machine"):
        run_train(parameters, "G0", 0)
    assert not (tmp_path / "students").exists()
    with pytest.raises(ValueError, match=r"names --config_file params/accelerate/nope.yaml, which is not in"):
        check_launch(accelerate("nope"))


def test_the_script_refuses_a_train_section_that_is_not_a_mapping(tmp_path):
    (tmp_path / "p.yaml").write_text("train: [G0]\n")
    with pytest.raises(ValueError, match=r"p.yaml line 1: section train must be a mapping of its parameters"):
        main(["--params", str(tmp_path / "p.yaml"), "--group", "G0", "--seed", "0"])
