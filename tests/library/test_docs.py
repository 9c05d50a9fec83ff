"""The documentation: the site builds strictly, every Python block of docs/ runs, the API reference
lists every public name, and no page, README or library source reads as a lab notebook."""

import contextlib
import importlib
import importlib.util
import io
import os
import pathlib
import pkgutil
import re
import subprocess
import sys

import keras
import pytest

import tf_overparam

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))

# A ```python block, optionally preceded by a marker line naming the one backend it needs.
BLOCK = re.compile(r"(?:<!-- (?P<marker>[\w-]+) -->\n)?```python\n(?P<code>.*?)```", flags=re.DOTALL)
MARKERS = {"tensorflow-only": "tensorflow", "jax-only": "jax"}


def _blocks(page):
    return [(match["marker"], match["code"]) for match in BLOCK.finditer(page.read_text())]


def _relative(page):
    return page.relative_to(DOCS).as_posix()


# --- the site builds strictly -------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built by `mkdocs build --strict` (warnings are errors: broken links and anchors,
    missing references), once for this module. The build is static (griffe reads the sources), so
    it runs on the TensorFlow run of the suite only."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the build does not depend on the backend; it runs with the TensorFlow run")
    if any(importlib.util.find_spec(name) is None for name in ("mkdocs", "material", "mkdocstrings")):
        if os.environ.get("CI") == "true":
            pytest.fail('mkdocs and mkdocstrings are missing on CI: pip install -e ".[docs]"')
        pytest.skip('mkdocs and mkdocstrings are not installed (pip install -e ".[docs]")')
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", "mkdocs.yml", "--site-dir", site_dir],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return site_dir


def test_site_builds_strictly(site):
    for page in PAGES:
        built = site / page.relative_to(DOCS).with_suffix("") / "index.html"
        if page.name == "index.md":
            built = site / page.relative_to(DOCS).with_name("index.html")
        assert built.is_file(), f"{_relative(page)} was not built ({built})"


def _public_modules():
    """tf_overparam and each of its importable public modules and subpackages."""
    modules = [tf_overparam]
    for info in pkgutil.walk_packages(tf_overparam.__path__, prefix="tf_overparam."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except ImportError:
            continue  # a module that moved out of the library: its stub raises, saying where it went
    return modules


def _public_names(module):
    """The module's `__all__`, or else the classes and functions it defines without a leading `_`."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (isinstance(value, type) or callable(value))
        and getattr(value, "__module__", None) == module.__name__
    ]


def test_api_reference_lists_every_public_name(site):
    html = (site / "api" / "index.html").read_text()
    anchors = set(re.findall(r'id="(tf_overparam(?:\.\w+)*)"', html))
    modules = _public_modules()
    # A name is listed when it is documented at the top level or directly under a module (not as a
    # method of a class that happens to share its name).
    parents = {module.__name__ for module in modules}
    documented = {anchor.rsplit(".", 1)[-1] for anchor in anchors if anchor.rsplit(".", 1)[0] in parents}
    documented |= {anchor.rsplit(".", 1)[-1] for anchor in anchors if anchor in parents}
    missing = {
        f"{module.__name__}.{name}" for module in modules for name in _public_names(module) if name not in documented
    }
    assert not missing, f"not in docs/api.md: {sorted(missing)}"
    assert {"OverparamDense", "collapse", "EndToEndModel", "end_to_end_direction"} <= documented


# --- every Python block of the docs runs ------------------------------------------------------


@pytest.mark.parametrize("page", [page for page in PAGES if _blocks(page)], ids=_relative)
def test_python_blocks_of_a_page_run(page, tmp_path, monkeypatch):
    """A page's blocks run in order in one namespace, as a reader would paste them, in a fresh
    folder (some save files); a block marked for one backend runs on that backend only."""
    backend = keras.backend.backend()
    code = []
    for marker, block in _blocks(page):
        assert marker is None or marker in MARKERS, f"{_relative(page)}: unknown marker {marker!r}"
        if marker is None or MARKERS[marker] == backend:
            code.append(block)
    if not code:
        pytest.skip(f"every block of {_relative(page)} needs another backend")
    monkeypatch.chdir(tmp_path)
    keras.utils.set_random_seed(0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile("\n".join(code), str(page), "exec"), {"__name__": "__docs__"})  # noqa: S102 - our own docs
    # An example that trains prints its losses: a diverged one would print nan or inf.
    assert not re.search(r"\b(nan|inf)\b", printed.getvalue()), printed.getvalue()


# --- no lab notebook ------------------------------------------------------------------------------

# Anywhere: talk about issues and how a run was paused.
NOTEBOOK = re.compile(r"\bissue #?\d+|\bthe issue's|\bSIGSTOP\b", flags=re.IGNORECASE)
# A commit hash (7-40 hex digits, at least one letter and one digit) and a machine's load.
COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
LOAD = re.compile(r"\bload average\b", flags=re.IGNORECASE)
# Results pages may cite a run's provenance (its commit, machine, load) once per table.
RESULTS_PAGES = ("results/", "performance.md")
TABLE_RULE = re.compile(r"^\|(?:\s*:?-{3,}:?\s*\|)+\s*$", flags=re.MULTILINE)


def _library_sources():
    return sorted((ROOT / "tf_overparam").rglob("*.py"))


def test_notebook_patterns_catch_what_they_should():
    assert NOTEBOOK.search("as issue 10 says") and NOTEBOOK.search("The issue's estimate")
    assert NOTEBOOK.search("paused by SIGSTOP") and not NOTEBOOK.search("keras-team/keras#20585")
    assert COMMIT.search("at commit d0c6ba5,") and COMMIT.search("(a1ee2c8)")
    assert not COMMIT.search("1e-10, 3136x512, deadline, 0.0654, 1234567")
    assert LOAD.search("load average 1.2-4.9")


@pytest.mark.parametrize(
    "path", [ROOT / "README.md", *_library_sources()], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_readme_and_library_sources_hold_no_lab_notebook(path):
    text = path.read_text()
    for pattern in (NOTEBOOK, COMMIT, LOAD):
        found = [match.group() for match in pattern.finditer(text)]
        assert not found, f"{path.relative_to(ROOT)}: {found}"


@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_docs_hold_no_lab_notebook(page):
    text = page.read_text()
    found = [match.group() for match in NOTEBOOK.finditer(text)]
    assert not found, f"{_relative(page)}: {found}"
    provenance = [match.group() for pattern in (COMMIT, LOAD) for match in pattern.finditer(text)]
    if not _relative(page).startswith(RESULTS_PAGES):
        assert not provenance, f"{_relative(page)} is not a results page: {provenance}"
    else:
        tables = len(TABLE_RULE.findall(text))
        assert len(provenance) <= tables, f"{_relative(page)}: {provenance} for {tables} tables"
