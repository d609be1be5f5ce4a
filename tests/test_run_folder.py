"""One writer per run folder, and a run folder's files read as hostile input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loraloom.cli import main
from loraloom.harness.store import DB_NAME, Store


def test_a_second_experiment_on_one_run_folder_is_refused_until_the_first_ends(tmp_path):
    with Store(tmp_path):
        with pytest.raises(ValueError, match=rf"{tmp_path}: an experiment \(pid \d+\) is writing to this run folder"):
            Store(tmp_path)
        with Store(tmp_path, create=False) as reader:  # a report may read meanwhile
            assert reader.statuses() == {}
    with Store(tmp_path):  # free once the first closed
        pass


def test_the_lock_dies_with_a_killed_writer(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from loraloom.harness.store import Store; s = Store({str(tmp_path)!r}); print('held', flush=True); input()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match=rf"pid {holder.pid}\)"):
        Store(tmp_path)
    holder.kill()
    holder.wait(timeout=30)
    with Store(tmp_path):
        pass


@pytest.mark.parametrize("content", [b"", b"SQLite format 3\x00" + b"\xff" * 200, b"not a database at all\n" * 100])
def test_report_on_a_corrupt_database_is_one_line(tmp_path, capsys, content):
    (tmp_path / DB_NAME).write_bytes(content)
    code = main(["report", str(tmp_path), "--no-plots"])
    err = capsys.readouterr().err
    if content:  # an empty file is a new, empty SQLite database
        assert code == 2 and err.startswith("loraloom: error: ") and err.count("\n") == 1, err
        assert str(tmp_path / DB_NAME) in err
    assert "Traceback" not in err
