"""Atomic writes: a failure part-way leaves the previous file intact and no temporary behind."""
import json

import numpy as np
import pytest
import torch

from helpers.errors import OutputError
from helpers.files import atomic_write, save_json, writable_dir


def test_failure_inside_the_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.bin"
    with atomic_write(path) as f:
        f.write(b"good")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_write(path) as f:
            f.write(b"half")
            raise RuntimeError("crash while writing")
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_save_json_writes_numpy_and_torch_values_and_creates_folders(tmp_path):
    path = save_json(tmp_path / "a" / "b.json", {"acc": np.float32(0.5), "lrs": np.arange(3),
                                                 "t": torch.tensor(2.0), "where": tmp_path})
    assert json.loads(path.read_text()) == {"acc": 0.5, "lrs": [0, 1, 2], "t": 2.0, "where": str(tmp_path)}


def test_an_unwritable_output_folder_is_one_line_naming_the_flag(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    assert writable_dir(tmp_path / "new" / "folder", "--out") == tmp_path / "new" / "folder"   # made
    with pytest.raises(OutputError, match=r"cannot write to .*file.txt/sub \(.+\): choose a writable folder with --out$"):
        writable_dir(tmp_path / "file.txt" / "sub", "--out")
