"""bench/report.py's write_results: the JSON always carries the environment, the section replaces its own block."""

from __future__ import annotations

import json

from bench.report import write_results


def test_write_results_adds_the_environment_unless_given_and_replaces_its_section(tmp_path):
    md = tmp_path / "R.md"
    md.write_text("# R\n\n<!-- bench:a -->\nold\n<!-- /bench:a -->\n\n<!-- bench:b -->\nkeep\n<!-- /bench:b -->\n")
    measured = {"x": 1}
    write_results("a", measured, "## A\nnew", results_dir=tmp_path, results_md=md)
    written = json.loads((tmp_path / "a.json").read_text())
    assert written["x"] == 1 and {"python", "commit", "cpu", "versions"} <= set(written["environment"])
    assert measured == {"x": 1}  # the caller's dict is not changed
    write_results("c", {"environment": {"machine": "m"}}, "## C", results_dir=tmp_path, results_md=md)
    assert json.loads((tmp_path / "c.json").read_text()) == {"environment": {"machine": "m"}}
    text = md.read_text()
    assert "<!-- bench:a -->\n## A\nnew\n<!-- /bench:a -->" in text and "old" not in text
    assert "<!-- bench:b -->\nkeep\n<!-- /bench:b -->" in text
    assert text.rstrip().endswith("<!-- bench:c -->\n## C\n<!-- /bench:c -->")
