"""The repository's shape: modules small enough to read, one home for each shared helper.

The layout rules the project keeps: no module of the library or
the experiments over 400 lines, run state held by objects rather than closures, and one
definition of each timing and reporting helper of the benchmarks.
"""

import ast
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MAX_LINES = 400


def _modules(*folders):
    for folder in folders:
        yield from sorted((REPO_ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", ["tf_overparam", "experiments", "benchmarks"])
def test_no_module_is_over_the_line_limit(folder):
    too_long = {
        str(path.relative_to(REPO_ROOT)): n
        for path in _modules(folder)
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_experiments_keep_state_in_objects_not_closures():
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
        for path in _modules("experiments")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Nonlocal)
    ]
    assert not offenders, f"`nonlocal` in {offenders}"


@pytest.mark.parametrize("name", ["compiled_loop", "machine_info", "format_tables", "cnn_models"])
def test_each_benchmark_helper_is_defined_once(name):
    definitions = [
        str(path.relative_to(REPO_ROOT))
        for path in _modules("benchmarks", "experiments")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name
    ]
    assert len(definitions) == 1, f"{name} defined in {definitions}"
