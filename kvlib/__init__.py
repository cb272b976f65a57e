"""kvlib: multi-teacher KV-cache distillation across models that differ in tokenizer, depth, head size
and number of KV heads.

Inside kvlib a per-layer KV tensor is always ``(B, H, T, D)``: batch, KV heads, time, head dim;
suffixes ``t`` / ``s`` mean teacher / student. Only :mod:`kvlib.hf` touches Hugging Face caches.
"""

from pathlib import Path

__version__ = "0.1.0"


def project_root(start: str | Path | None = None) -> Path:
    """The compendium's root: the nearest folder at or above ``start`` (default: the working directory)
    that holds ``dvc.yaml``. Notebooks build every path from it, whether papermill runs them from the
    root or nbval / JupyterLab from ``notebooks/``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    raise ValueError(f"no dvc.yaml in {here} or above it; run from inside the kvlib project")
