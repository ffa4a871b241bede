"""pytest plugin (loaded by pyproject's addopts): smoke mode unless the user says otherwise.

A plain `pytest` then re-executes the notebooks on a small real subset in minutes, on any
machine; `SMOKE_TEST=0 pytest` asks for the full settings (hours on a CPU). The variables are
set when pytest starts, so the notebook kernels that nbval launches inherit them too.
"""
import os

os.environ.setdefault("SMOKE_TEST", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# nbval runs each notebook in notebooks/: a CIFAR10_DIR given relative to where pytest was
# started must not change its meaning there
if os.environ.get("CIFAR10_DIR") and os.path.isdir(os.environ["CIFAR10_DIR"]):
    os.environ["CIFAR10_DIR"] = os.path.abspath(os.environ["CIFAR10_DIR"])
