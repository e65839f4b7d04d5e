"""A buffer whose journal lost records refuses to start, says why and what to do, and with
``buffer.journal_repair`` starts without serving anything the lost records may have concerned."""

from __future__ import annotations

import subprocess

import pytest

from streamrl.common.messages import encode
from streamrl.common.modes import FsyncPolicy
from streamrl.services.buffer.journal import Journal, _segments
from streamrl.testing import local_run_config, scrape, wait_until, write_config
from support import scored_item

pytestmark = pytest.mark.slow


def test_a_damaged_journal_stops_the_buffer_until_the_operator_repairs(tmp_path, tiny_model_dir, services):
    sections = local_run_config(tmp_path, tiny_model_dir)
    journal_dir = tmp_path / "run" / "buffer"
    journal = Journal(journal_dir, fsync=FsyncPolicy.ALWAYS)
    for g in range(4):
        for k in range(2):
            journal.accept(encode(scored_item(f"g{g}", k)))
    journal.close()
    ((_, segment),) = _segments(journal_dir)
    data = bytearray(segment.read_bytes())
    data[len(data) // 3] ^= 0xFF  # mid-segment: intact records follow
    segment.write_bytes(bytes(data))

    config = write_config(tmp_path / "run.toml", sections)
    buffer = services(config).start("buffer")
    try:
        code = buffer.wait(timeout=60)
    except subprocess.TimeoutExpired:
        code = None
    log = (tmp_path / "buffer-0.log").read_text()
    assert code == 2, log
    assert "is damaged" in log and "buffer.journal_repair = true" in log, log
    assert segment.exists()  # nothing moved or deleted without the operator's decision

    repaired = services(config).start("buffer", 1, "--set", "buffer.journal_repair=true")
    port = sections["metrics"]["buffer_port"] + 1

    def recovered():
        try:
            return scrape(port).get("streamrl_buffer_recovered_rollouts")
        except ConnectionError:
            return None

    assert wait_until(lambda: recovered() is not None, timeout=60), (tmp_path / "buffer-1.log").read_text()
    assert recovered() == 0  # everything accepted before the lost records is quarantined
    assert repaired.poll() is None
    assert [p.name.split(".log")[0] for p in (journal_dir / "damaged").iterdir()] == [segment.name[:-4]]
