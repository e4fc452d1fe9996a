"""The notebooks run top to bottom (nbclient, a kernel on this interpreter, CPU devices)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys

import pytest

# The `test` extra installs these (pip install -e ".[test]"); a skip says so where they are missing.
nbformat = pytest.importorskip("nbformat", reason='needs the test extra: pip install -e ".[test]"')
NotebookClient = pytest.importorskip("nbclient", reason='needs the test extra: pip install -e ".[test]"').NotebookClient
pytest.importorskip("ipykernel", reason='needs the test extra: pip install -e ".[test]"')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = "mimo-jax-tests"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernelspec running the interpreter of the tests, with the repository importable."""
    home = tmp_path_factory.mktemp("jupyter")
    spec_dir = home / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    inherited = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"PYTHONPATH": os.pathsep.join([ROOT, *inherited])}  # the kernel starts in another directory
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mimo_jax tests",
        "language": "python",
        "env": env,
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(home))
    mp.setenv("JUPYTER_RUNTIME_DIR", str(home / "runtime"))
    mp.setenv("IPYTHONDIR", str(home / "ipython"))
    yield KERNEL
    mp.undo()


def run_notebook(name: str, kernel: str, workdir):
    nb = nbformat.read(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), as_version=4)
    NotebookClient(nb, kernel_name=kernel, timeout=900, resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


def outputs(nb) -> str:
    return "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)


@pytest.fixture(scope="module")
def executed(kernel, tmp_path_factory):
    """Both notebooks run at once, each in its own kernel (their compiles use about one core each): name -> future
    of the executed notebook."""
    names = ("multidevice", "quickstart")  # the longer first
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        yield {name: pool.submit(run_notebook, name, kernel, tmp_path_factory.mktemp(name)) for name in names}


def test_quickstart(executed):
    text = outputs(executed["quickstart"].result())
    assert "3 MTP" in text and "expected tokens per verify step" in text
    assert "layer 0: full" in text and "layer 1: SWA" in text and "per sequence" in text


def test_multidevice(executed):
    text = outputs(executed["multidevice"].result())
    assert "{'data': 2, 'tensor': 2, 'expert': 2}" in text
    assert "RunSummary(completed=3" in text and "RunSummary(completed=0, skipped=0, done_before=3" in text
