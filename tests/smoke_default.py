"""pytest plugin (loaded by pyproject's addopts): smoke mode unless the user says otherwise.

A plain `pytest` then re-executes the notebooks on a small real subset in minutes, on any
machine; `SMOKE_TEST=0 pytest` asks for the full settings (hours on a CPU). The variable is
set when pytest starts, so the notebook kernels that nbval launches inherit it too.
"""
import os

os.environ.setdefault("SMOKE_TEST", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
