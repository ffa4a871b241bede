"""The committed notebooks: complete, executed top to bottom, openable in Colab.

These tests read the .ipynb files as JSON and never execute them (nbval does that when pytest
collects notebooks/).
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
EXPECTED = ["01_data_exploration.ipynb", "02_augmentation_preview.ipynb", "03_lr_finder.ipynb",
            "04_training.ipynb", "05_error_analysis.ipynb", "06_training_fast.ipynb"]
REPO = re.search(r'^Repository = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
COLAB_URL = f"https://colab.research.google.com/github/{REPO.split('github.com/', 1)[1]}/blob/main/notebooks/"
IGNORE_TAG = "nbval-ignore-output"
COLAB_PACKAGES = ["albumentations==2.0.8", "torch-lr-finder", "torchsummary", "grad-cam"]


def load(name: str) -> dict:
    return json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))


def source(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def ignored(cell: dict) -> bool:
    return IGNORE_TAG in cell.get("metadata", {}).get("tags", [])


@pytest.fixture(params=EXPECTED)
def notebook(request):
    path = NOTEBOOKS / request.param
    if not path.exists():
        pytest.fail(f"{path} is missing")
    return request.param, load(request.param)


def test_notebooks_are_numbered_in_order():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == EXPECTED
    numbers = [int(re.match(r"(\d\d)_", n).group(1)) for n in names]
    assert numbers == list(range(1, len(names) + 1))


def test_no_error_outputs(notebook):
    name, nb = notebook
    for i, cell in enumerate(code_cells(nb)):
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", \
                f"{name}: code cell {i} has an error output: {out.get('ename')}: {out.get('evalue')}"
            text = "".join(out.get("text", "")) if out["output_type"] == "stream" else ""
            assert "Traceback (most recent call last)" not in text, f"{name}: code cell {i} shows a traceback"


def test_every_code_cell_was_executed_top_to_bottom(notebook):
    name, nb = notebook
    counts = [c["execution_count"] for c in code_cells(nb)]
    missing = [i for i, n in enumerate(counts) if n is None]
    assert not missing, f"{name}: code cells {missing} were never executed"
    # one fresh kernel, top to bottom, each cell once: no hidden state from out-of-order runs
    assert counts == list(range(1, len(counts) + 1)), f"{name}: execution counts {counts}"


def test_opens_with_markdown_and_a_colab_badge(notebook):
    name, nb = notebook
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown", f"{name} must open with a markdown cell"
    text = source(first)
    assert text.lstrip().startswith("# "), f"{name}: the first cell should start with a title"
    assert "colab-badge.svg" in text, f"{name}: no 'Open in Colab' badge in the first cell"
    assert COLAB_URL + name in text, f"{name}: the badge must link to {COLAB_URL + name}"


def test_first_code_cell_is_the_guarded_colab_setup(notebook):
    name, nb = notebook
    cell = code_cells(nb)[0]
    text = source(cell)
    assert not any(line.lstrip().startswith(("!", "%")) for line in text.splitlines()), \
        f"{name}: the Colab set-up must use subprocess/os, not ! or % magics"
    tree = ast.parse(text)
    guards = [node for node in tree.body if isinstance(node, ast.If)]
    assigns = [node for node in tree.body if isinstance(node, ast.Assign)]
    others = [node for node in tree.body if not isinstance(node, (ast.If, ast.Assign, ast.Import, ast.ImportFrom))]
    assert len(guards) == 1 and not others, \
        f"{name}: outside imports and REPO, everything in the set-up cell must sit under the Colab guard"
    assert [ast.unparse(a) for a in assigns] == [f"REPO = {REPO!r}"], \
        f"{name}: the set-up must name the repository once, as pyproject.toml does: {REPO}"
    assert ast.unparse(guards[0].test).startswith("'google.colab' in sys.modules")
    assert not guards[0].orelse, f"{name}: the Colab guard must do nothing outside Colab"
    body = ast.unparse(guards[0])
    assert "'git', 'clone'" in body and "REPO" in body
    for package in COLAB_PACKAGES:
        assert repr(package) in body, f"{name}: the set-up must install {package}"
    for package in ("requirements.txt", "jupyterlab", "nbval", "pytest"):
        assert package not in body, f"{name}: Colab has Jupyter; the set-up must not install {package}"
    assert "'--no-deps', '-e', '.'" in body, f"{name}: the course package must be installed without its deps"
    assert "torch.cuda.is_available()" in body, f"{name}: the set-up must warn when no GPU runtime is chosen"
    chdirs = [ast.unparse(n) for n in ast.walk(guards[0])
              if isinstance(n, ast.Call) and ast.unparse(n.func) == "os.chdir"]
    assert chdirs and chdirs[-1] == "os.chdir('notebooks')", f"{name}: the set-up must end in notebooks/"
    assert cell.get("outputs", []) == [], f"{name}: outside Colab the set-up cell must print nothing"


def test_teaches_beyond_its_code(notebook):
    name, nb = notebook
    text = "\n".join(source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "Expected on a full run" in text, f"{name}: no 'Expected on a full run' note"
    exercises = re.search(r"^## Exercises\n(.*?)^## ", text, re.M | re.S)
    assert exercises, f"{name}: no '## Exercises' section"
    tasks = re.findall(r"^\d\. ", exercises.group(1), re.M)
    assert 2 <= len(tasks) <= 3, f"{name}: {len(tasks)} exercises, want 2-3"
    assert exercises.group(1).count("*") >= 2 * len(tasks), f"{name}: each exercise needs an italic hint"
    references = re.search(r"^## References\n(.*?)^## ", text, re.M | re.S)
    assert references and len(re.findall(r"\]\(https?://", references.group(1))) >= 2, \
        f"{name}: the References section needs linked sources"


def test_closes_with_a_summary(notebook):
    name, nb = notebook
    last = nb["cells"][-1]
    assert last["cell_type"] == "markdown", f"{name} must close with a markdown cell"
    assert re.search(r"^#+\s*Summary", source(last), re.M), f"{name}: the last cell must be a '## Summary'"


def test_states_where_its_data_came_from_in_one_line_and_no_test_plumbing(notebook):
    """One short provenance line (the data source); the rest of a run's provenance lives in
    results/. No "smoke mode: on/off" or commit hashes in what the student reads."""
    name, nb = notebook
    cells = [c for c in code_cells(nb) if "print(" in source(c) and "data.source" in source(c)]
    assert cells, f"{name}: no cell prints where the data came from (data.source)"
    assert all(ignored(c) for c in cells), f"{name}: the data-source cell must be tagged {IGNORE_TAG}"
    shown = "\n".join(source(c) + "".join(o.get("text", "") if isinstance(o.get("text"), str) else
                                          "".join(o.get("text", [])) for o in c.get("outputs", []))
                      for c in code_cells(nb))
    assert not re.search(r"smoke mode: \{|smoke mode: o(n|ff)|commit [0-9a-f]{8}", shown), \
        f"{name}: test plumbing in view (a smoke-mode line or a commit hash)"


def test_nbval_markers_are_tags_and_compared_cells_are_clean(notebook):
    name, nb = notebook
    for i, cell in enumerate(code_cells(nb)):
        assert "NBVAL_" not in source(cell), \
            f"{name}: code cell {i}: mark run-dependent cells with the {IGNORE_TAG} tag, not in the source"
        if ignored(cell):
            continue
        for out in cell.get("outputs", []):
            # compared cells: no warnings or progress bars on stderr, no stray figure reprs
            assert not (out["output_type"] == "stream" and out["name"] == "stderr"), \
                f"{name}: compared code cell {i} writes to stderr: {''.join(out['text'])[:200]!r}"
            assert out["output_type"] != "execute_result" or "<Figure" not in "".join(
                out["data"].get("text/plain", "")), f"{name}: code cell {i} ends with a figure repr"


def test_a_progress_bar_is_committed_as_one_line(notebook):
    name, nb = notebook
    for c in code_cells(nb):
        bars = [o for o in c.get("outputs", []) if o.get("name") == "stderr"]
        assert len(bars) <= 1, f"{name}: a cell commits {len(bars)} stderr outputs (a progress bar's every frame)"


def test_outputs_print_no_path_of_the_machine_that_ran_them(notebook):
    name, nb = notebook
    for i, cell in enumerate(code_cells(nb)):
        for out in cell.get("outputs", []):
            text = "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", ""))
            for pattern in ("/work/", "/home/", "/root/", "/Users/", "/tmp/", "site-packages", "C:\\"):
                assert pattern not in text, f"{name}: code cell {i} prints a machine path ({pattern})"


def test_no_hard_coded_local_paths(notebook):
    name, nb = notebook
    for i, cell in enumerate(nb["cells"]):
        text = source(cell)
        for pattern in ("/work/", "/home/", "/Users/", "/tmp/", "C:\\"):
            assert pattern not in text, f"{name}: cell {i} hard-codes a local path ({pattern})"


def test_plain_pytest_runs_in_smoke_mode_unless_told_otherwise(tmp_path):
    """`pytest` with no SMOKE_TEST must not re-execute notebook 04 at full settings (hours on
    a CPU): the smoke_default plugin that pyproject.toml loads sets SMOKE_TEST=1 for the
    session and for every notebook kernel it starts; an explicit SMOKE_TEST=0 wins."""
    import os
    import subprocess
    import sys

    probe = tmp_path / "test_probe.py"
    probe.write_text("import os\n\ndef test_mode():\n    print('SMOKE_TEST=' + os.environ.get('SMOKE_TEST', 'unset'))\n"
                     "    print('CIFAR10_DIR=' + os.environ['CIFAR10_DIR'])\n")
    (tmp_path / "data").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "SMOKE_TEST"}
    env["CIFAR10_DIR"] = os.path.relpath(tmp_path / "data", ROOT)         # relative to where pytest starts
    for setting, expected in ((None, "SMOKE_TEST=1"), ("0", "SMOKE_TEST=0")):
        run_env = env if setting is None else {**env, "SMOKE_TEST": setting}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
                               str(ROOT), "-n", "0", "-s", "-q", str(probe)], cwd=ROOT, env=run_env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert expected in proc.stdout
        assert f"CIFAR10_DIR={tmp_path / 'data'}" in proc.stdout   # made absolute for the notebooks' kernels


def test_smoke_runs_keep_their_artifacts_apart_from_a_full_run():
    """A smoke pytest re-executes 03-05, which write checkpoints: they must not overwrite (or be
    resumed as) the student's full run in artifacts/, so smoke mode uses artifacts/smoke/."""
    import os
    import subprocess
    import sys

    code = ("from helpers import config, lr_finder; smoke = config.smoke_mode(); "
            "print(config.artifacts_dir(smoke)); print(lr_finder.lr_choice_file(smoke))")
    found = {}
    for setting in ("1", "0"):
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "SMOKE_TEST": setting})
        assert proc.returncode == 0, proc.stderr[-2000:]
        found[setting] = proc.stdout.split()
    assert found["0"] == [str(ROOT / "artifacts"), str(ROOT / "artifacts" / "lr_choice.json")]
    assert found["1"] == [str(ROOT / "artifacts" / "smoke"), str(ROOT / "artifacts" / "smoke" / "lr_choice.json")]
