"""Seed 000 runs unchanged on top of build_llm and prints the seed's own numbers.

The notebook's code cells are executed in order (the notebook's text export has no cell
boundaries between code and output, so a cell's code ends where its printed output begins);
what each cell prints is compared with what the seed printed.
"""

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

SEED = Path(__file__).resolve().parents[1].parent / "shared" / "seeds" / "000_a837ce1feb5e072c.txt"
NUMBER = re.compile(r"-?\d+\.\d+")


def same_output(printed: str, expected: str) -> bool:
    """Equal text, and every decimal equal to within one unit of its last printed digit.

    The logits are printed to 4 decimals; one of them (-0.93225014 here) sits on a rounding
    boundary, so a different BLAS summation order can flip its last digit.
    """
    expected = expected.replace("2.9.1+cpu", torch.__version__)  # the seed's PyTorch version line
    a, b = NUMBER.split(printed.strip()), NUMBER.split(expected.strip())
    if [" ".join(s.split()) for s in a] != [" ".join(s.split()) for s in b]:
        return False
    for x, y in zip(NUMBER.findall(printed), NUMBER.findall(expected)):
        places = len(y.split(".")[1])
        if abs(float(x) - float(y)) > 10 ** -places * 1.001:
            return False
    return True


def code_cells(text: str) -> list[str]:
    return re.split(r"^In \[\d+\]:\n", text, flags=re.M)[1:]  # each runs on into the next prose


def run_cell(cell: str, namespace: dict) -> tuple[str, str]:
    """Execute the cell's code, statement group by statement group, until what it printed is the
    rest of the cell (or prose follows). Returns (printed, expected)."""
    chunks = cell.split("\n\n")
    printed = io.StringIO()
    pending, i = "", 0
    while i < len(chunks):
        if printed.getvalue():  # does the rest begin with what the code printed?
            n_lines = len(printed.getvalue().strip("\n").split("\n"))
            rest = "\n".join("\n\n".join(chunks[i:]).strip("\n").split("\n")[:n_lines])
            if same_output(printed.getvalue(), rest):
                return printed.getvalue(), rest
        pending += ("\n\n" if pending else "") + chunks[i]
        i += 1
        if i < len(chunks) and chunks[i][:1] in (" ", "\t"):
            continue  # an indented block goes on after a blank line
        try:
            code = compile(pending, "seed-000", "exec")
        except SyntaxError:
            # Prose: the notebook's markdown after a cell that printed nothing.
            return printed.getvalue(), "\n\n".join([pending, *chunks[i:]]) if printed.getvalue() else ""
        with contextlib.redirect_stdout(printed):
            exec(code, namespace)
        pending = ""
    return printed.getvalue(), ""


@pytest.mark.skipif(not SEED.exists(), reason="needs ../shared/seeds (the seed notebooks) beside the repository")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the seed's outputs are those of a CPU-only machine")
def test_seed_000_runs_unchanged_and_prints_its_numbers():
    namespace: dict = {"__name__": "seed000"}
    outputs = []
    for cell in code_cells(SEED.read_text(encoding="utf-8")):
        printed, expected = run_cell(cell, namespace)
        assert same_output(printed, expected), f"cell printed:\n{printed}\nthe seed printed:\n{expected}"
        outputs.append(printed)
    text = "\n".join(outputs)
    # The numbers the issue names, checked again explicitly.
    assert "Número total de parâmetros: 163,009,536" in text
    assert "Tamanho total do modelo: 621.83 MB" in text
    assert namespace["out"].tolist() == [[46, 308, 5549, 523, 1350, 645, 34381, 37516, 12434, 42030, 37383, 678]]
    assert "O gato sobe no Dice eighty Driverfoundland Garner 19" in text
    assert len(outputs) == 14  # In [1] .. In [17], as numbered in the seed


def test_output_comparison_is_strict_beyond_the_last_digit():
    assert same_output("x: -0.9323, 1.0000", "x: -0.9322, 1.0000")
    assert not same_output("x: -0.9320", "x: -0.9322")
    assert not same_output("163,009,537", "163,009,536")
    assert not same_output("Dice eighty", "Dice eighty Driver")
