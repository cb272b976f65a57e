"""The pipeline's inputs from outside the project, tracked by content: local files and the machine.

DVC records a stage's dependencies as files of the project; a GSM8K-format file or a checkpoint named by
path in the params lies elsewhere, so ``dvc.lock`` would hold only its path and replacing it in place
would leave ``dvc status`` "up to date". The ``inputs`` stage (``always_changed``: it runs, in seconds, on
every ``dvc repro``) writes one small JSON per consumer into ``reports/inputs/`` with the SHA-256 of what
that consumer reads, and each consuming stage depends on its own file:

- ``data.json``: the GSM8K-format files of the data section (``files``: split -> path);
- ``teacher-<name>.json``: the checkpoint directory (weights, config, tokenizer) of a teacher given by ``path``;
- ``student.json``: the student's checkpoint directory, when it is given by ``path``;
- ``latent_student.json``: the latent study's student checkpoint directory, when it is given by ``path``;
- ``machine.json``: the CPU model and count, the GPUs, and the versions of Python and torch, on which the
  benchmarks depend (timings are a property of the machine: another machine re-measures them).

A file's content is what DVC compares, so a stage re-runs exactly when what it reads changed: an input
rewritten with the same bytes changes nothing downstream. A directory's hash covers every file under it
(relative path and bytes, in path order). An input that does not exist is refused, naming its key.

    python -m kvlib.inputs --params params/default.yaml --out reports/inputs
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path

from kvlib.config import load_params
from kvlib.files import write_json

CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of a directory's files (each one's relative path and SHA-256, sorted)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise ValueError(f"{path} does not exist")
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def external_inputs(params: dict) -> dict[str, dict[str, str]]:
    """Consumer (``data``, ``teacher-<name>``, ``student``, ``latent_student``) -> {params key: path} of the
    inputs it reads."""
    inputs = {"data": {f"data.files.{split}": p for split, p in (params.get("data", {}).get("files") or {}).items()}}
    for name, teacher in params.get("teacher", {}).get("teachers", {}).items():
        inputs[f"teacher-{name}"] = {f"teacher.teachers.{name}.path": teacher["path"]} if teacher.get("path") else {}
    student = params.get("train", {}).get("student", {})
    inputs["student"] = {"train.student.path": student["path"]} if student.get("path") else {}
    latent = params.get("latent", {}).get("student", {})
    inputs["latent_student"] = {"latent.student.path": latent["path"]} if latent.get("path") else {}
    return inputs


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    query = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=False
    )
    return sorted(query.stdout.split("\n")[:-1]) if query.returncode == 0 else []


def machine() -> dict:
    """What the benchmarks' timings depend on: CPU model and usable cores, GPUs, Python and torch versions."""
    return {
        "cpu": _cpu_model(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpus": _gpus(),
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
    }


def write_inputs(params: dict, out_dir: str | Path) -> dict[str, dict]:
    """Write ``<consumer>.json`` ({params key: {"path", "sha256"}}) and ``machine.json`` into ``out_dir``."""
    out, written = Path(out_dir), {}
    for consumer, named in external_inputs(params).items():
        record = {}
        for key, path in named.items():
            if not Path(path).exists():
                raise ValueError(f"{key} names {path}, which does not exist; fix the path in the params file")
            record[key] = {"path": str(path), "sha256": content_sha256(path)}
        written[consumer] = record
    written["machine"] = machine()
    for name in {p.stem for p in out.glob("*.json")} - set(written) if out.is_dir() else ():
        (out / f"{name}.json").unlink()  # a consumer the params no longer have
    for name, record in written.items():
        write_json(out / f"{name}.json", record)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params/default.yaml")
    parser.add_argument("--out", default="reports/inputs")
    args = parser.parse_args(argv)
    write_inputs(load_params(args.params), args.out)


if __name__ == "__main__":
    main()
