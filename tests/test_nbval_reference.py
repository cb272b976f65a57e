"""tests/nbval/ holds copies of notebooks whose outputs are deterministic, with those outputs kept, so that
nbval (--nbval-lax) checks them cell by cell; notebooks/ itself is committed without outputs. The copies
must not drift from the notebooks they check."""

import nbformat
import pytest

from kvlib import project_root

ROOT = project_root()
REFERENCES = sorted((ROOT / "tests" / "nbval").glob("*.ipynb"))


@pytest.mark.parametrize("reference", REFERENCES, ids=lambda p: p.name)
def test_reference_has_the_notebooks_code_and_outputs_to_check(reference):
    ref = nbformat.read(reference, as_version=4)
    nb = nbformat.read(ROOT / "notebooks" / reference.name, as_version=4)
    assert [(c.cell_type, c.source) for c in ref.cells] == [(c.cell_type, c.source) for c in nb.cells]
    checked = [c for c in ref.cells if "nbval-check-output" in c.metadata.get("tags", [])]
    assert checked and all(c.outputs for c in checked)
