"""streamrl.common.ledger: each replica's measured counts file (atomic replace, a restart continues from it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from streamrl.common.ledger import Ledger, ledger_path, read_ledgers


def test_counts_are_written_at_once_and_a_restart_continues(tmp_path):
    path = ledger_path(tmp_path, "generator", 1)
    assert path == tmp_path / "ledger" / "generator-1.json"
    first = Ledger(path)
    first.add("sent")
    first.add("sent", 2)
    assert json.loads(path.read_text())["counts"] == {"sent": 3}
    restarted = Ledger(path)  # a process started again with the same service and index
    restarted.add("sent", 4)
    assert json.loads(path.read_text())["counts"] == {"sent": 7}
    assert [p.name for p in path.parent.iterdir()] == ["generator-1.json"]  # no temporary file left


def test_deferred_counts_and_gauges_wait_for_flush(tmp_path):
    path = ledger_path(tmp_path, "buffer", 0)
    ledger = Ledger(path)
    ledger.add("accepted", 5, flush=False)
    ledger.set_gauge("held", 5)
    assert not path.exists()
    ledger.flush()
    assert json.loads(path.read_text()) == {"counts": {"accepted": 5}, "held": 5}


def test_a_failed_write_leaves_the_old_file_whole_and_is_retried(tmp_path, monkeypatch, caplog):
    path = ledger_path(tmp_path, "scorer", 0)
    ledger = Ledger(path)
    ledger.add("scored", 2)

    def fail(*_args):
        raise OSError(28, "No space left on device")

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", fail)
    ledger.add("scored")  # logged, not raised: the service keeps running
    assert json.loads(path.read_text())["counts"] == {"scored": 2}
    assert [p.name for p in path.parent.iterdir()] == ["scorer-0.json"]
    monkeypatch.setattr(os, "replace", real_replace)
    ledger.add("scored")  # the count kept in memory is written with the next one
    assert json.loads(path.read_text())["counts"] == {"scored": 4}
    assert caplog.text.count("cannot write the ledger file") == 1


def test_an_unreadable_file_is_refused_with_the_fix(tmp_path):
    path = ledger_path(tmp_path, "scorer", 0)
    path.parent.mkdir(parents=True)
    path.write_text("[1, 2")
    with pytest.raises(ValueError, match=r"scorer-0.json.*fix: delete it"):
        Ledger(path)


def test_a_process_killed_mid_count_leaves_a_whole_file_that_its_restart_continues(tmp_path):
    """A real process counts as fast as it can and gets SIGKILL: the file is whole JSON (the atomic
    replace), and a restarted process continues from what it says."""
    path = ledger_path(tmp_path, "generator", 0)
    code = (
        "import sys; from pathlib import Path; from streamrl.common.ledger import Ledger\n"
        "ledger = Ledger(Path(sys.argv[1]))\n"
        "while True:\n    ledger.add('sent')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)])
    try:
        deadline = time.monotonic() + 60
        while not (path.exists() and json.loads(path.read_text())["counts"]["sent"] >= 200):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    counted = json.loads(path.read_text())["counts"]["sent"]
    assert counted >= 200
    Ledger(path).add("sent")
    assert json.loads(path.read_text())["counts"]["sent"] == counted + 1
    assert read_ledgers(tmp_path) == {"generator": [{"counts": {"sent": counted + 1}}]}
