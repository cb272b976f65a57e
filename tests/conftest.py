import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kvlib import project_root  # noqa: E402
from kvlib.config import load_params  # noqa: E402
from kvlib.runner import run_pipeline  # noqa: E402

SMOKE = project_root() / "build" / "smoke"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smoke():
    """The whole DVC pipeline on params/smoke.yaml, run once per session in build/smoke; its params."""
    shutil.rmtree(SMOKE, ignore_errors=True)
    run_pipeline(project_root() / "params" / "smoke.yaml", SMOKE)
    return load_params(project_root() / "params" / "smoke.yaml")
