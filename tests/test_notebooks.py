"""The example notebooks: examples/*.ipynb hold exactly the cells of the `# %%` scripts beside them
(the scripts are the source; jupytext writes the notebooks), and they run to the end in a Jupyter
kernel (nbclient), as a reader of the seed notebooks would run them."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = ("gpt_model", "abc_markov")
jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")


def cells(notebook) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source) for c in notebook.cells]


def test_every_cell_script_has_a_notebook():
    scripts = sorted(p.stem for p in EXAMPLES.glob("*.py") if "\n# %%" in "\n" + p.read_text(encoding="utf-8"))
    assert scripts == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_matches_its_script(name):
    from_script = jupytext.read(EXAMPLES / f"{name}.py")
    shipped = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    nbformat.validate(shipped)
    assert cells(shipped) == cells(from_script), (
        f"examples/{name}.ipynb is stale: run jupytext --to ipynb --set-kernel python3 examples/{name}.py")
    assert shipped.metadata.kernelspec.name == "python3"
    assert all(not c.get("outputs") for c in shipped.cells if c.cell_type == "code")  # shipped without outputs


def execute(name: str, cwd: Path, env: dict[str, str], monkeypatch) -> str:
    """Run the notebook in a fresh python3 kernel; return everything its cells printed."""
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for key, value in env.items():  # the kernel inherits this process's environment
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


# Slow (a Jupyter kernel each, 10-25 s): what they print is checked, more closely, by the faster runs of the
# same cells as scripts (test_examples.py; test_notebook_matches_its_script proves the cells are the same);
# these add only that the cells also run in a kernel, and CI's `make test-slow` runs them.
@pytest.mark.slow
def test_gpt_model_notebook_runs_and_prints_the_seed_numbers(tmp_path, monkeypatch):
    out = execute("gpt_model", tmp_path, {}, monkeypatch)
    assert out.count("same as the seed") == 5 and "DIFFERS" not in out
    assert "Total parameters: 163,009,536" in out


@pytest.mark.slow
def test_abc_markov_notebook_runs_and_writes_its_pictures(tmp_path, monkeypatch):
    out = execute("abc_markov", tmp_path, {"ABC_STEPS": "10", "ABC_WORDS": "1500", "ABC_NEW_TOKENS": "30",
                                           "ABC_OUT": str(tmp_path / "run"), "OMP_NUM_THREADS": "1"}, monkeypatch)
    assert "step   10: train" in out and "exact 0.1273" in out
    for name in ("inspect/next_token.png", "inspect/layers.png", "surprisal.html", "loss.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
