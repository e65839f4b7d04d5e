"""The learner's version counter across restarts: the published_version file and where to continue."""

from __future__ import annotations

import pytest

from streamrl.services.learner.versions import continue_at, read_published_version, write_published_version


def test_published_version_file(tmp_path):
    path = tmp_path / "run" / "published_version"
    assert read_published_version(path) is None
    write_published_version(path, 12)
    write_published_version(path, 13)
    assert read_published_version(path) == 13
    assert path.read_text() == "13\n"
    assert not path.with_name("published_version.tmp").exists()
    path.write_text("garbage")
    assert read_published_version(path) is None


@pytest.mark.parametrize(
    ("checkpoint", "published", "expected"),
    [
        (0, None, 0),  # a fresh run
        (7, 7, 7),  # killed right after a checkpoint: its version was the last published
        (7, 9, 10),  # killed two steps after the checkpoint: 8 and 9 are taken, continue at 10
        (7, 3, 7),  # an older file (e.g. copied folder): the checkpoint wins, never backwards
    ],
)
def test_continue_at_never_reuses_a_published_version(checkpoint, published, expected):
    assert continue_at(checkpoint, published) == expected
