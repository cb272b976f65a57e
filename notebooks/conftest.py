"""nbval runs every notebook with its smoke defaults, which read the smoke pipeline's outputs in build/smoke:
make sure they exist (tests/test_pipeline_dvc.py creates them when the whole suite runs)."""

from kvlib import project_root
from kvlib.runner import run_pipeline

ROOT = project_root()


def pytest_runtest_setup(item):
    if item.path.suffix == ".ipynb" and not (ROOT / "build" / "smoke" / "reports" / "REPORT.md").exists():
        run_pipeline(ROOT / "params" / "smoke.yaml", ROOT / "build" / "smoke")
