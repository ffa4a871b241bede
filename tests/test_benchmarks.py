"""benchmarks/benchmark.py runs every model's train and eval step (the fast net needs its
whitening filters from the data first, as training computes them)."""
import json
import subprocess
import sys

from conftest import REPO, needs_data, smoke_env

from helpers.models import MODELS


@needs_data
def test_benchmark_times_every_models_train_and_eval_step(tmp_path):
    out = tmp_path / "bench.jsonl"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "benchmark.py"), "--dry-run", "--device", "cpu",
                           "--skip", "data", "--precisions", "fp32", "--layouts", "nchw", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, env=smoke_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-800:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert not [r["error"] for r in rows if "error" in r]
    timed = {(r["kind"], r["model"]) for r in rows if r["images_per_s"] > 0}
    assert timed == {(kind, name) for kind in ("train", "eval") for name in MODELS}
