"""deploy/grafana/streamrl.json: importable structure, the panels the issue asks for, valid PromQL.

That every metric it reads is exported by the services is checked against a real run
scraped by a real Prometheus in tests/e2e/test_prometheus.py.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from promql import load_dashboard, metric_names, panels, queries, to_prometheus


def test_metric_names_of_hand_written_expressions():
    assert metric_names("rate(streamrl_a_total[$__rate_interval])") == {"streamrl_a_total"}
    assert metric_names('histogram_quantile(0.9, sum by (le, process) (rate(x_bucket{job=~"a.*", le!="1"}[5m])))') == {
        "x_bucket"
    }
    assert metric_names("sum(rate(a_sum[1m])) / sum without (instance) (rate(a_count[1m]))") == {"a_sum", "a_count"}
    assert metric_names("a * on(instance) group_left(process) b offset 5m > bool 1e3") == {"a", "b"}
    assert metric_names('up{job="by"} and topk(3, c:rule)') == {"up", "c:rule"}
    assert metric_names("vector(1) + 2.5") == set()


def test_dashboard_is_importable_with_a_prometheus_datasource_variable():
    board = load_dashboard()
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0


def test_dashboard_has_the_panels_the_issue_asks_for():
    exprs = " ".join(expr for _, expr in queries(load_dashboard()))
    rows = [p["title"] for p in load_dashboard()["panels"] if p["type"] == "row"]
    assert rows == [
        "Throughput",
        "Staleness",
        "Reward and KL",
        "Importance ratios",
        "Queue depths",
        "Weight sync",
        "Health",
        "People in the loop",
    ]
    wanted = [
        "streamrl_generator_rollouts_total",
        "streamrl_generator_tokens_total",
        "streamrl_learner_samples_total",
        "streamrl_buffer_staleness_bucket",
        "streamrl_learner_staleness_bucket",
        "streamrl_learner_reward_mean",
        "streamrl_learner_kl",
        "streamrl_learner_importance_ratio_mean",
        "streamrl_learner_importance_ratio_max",
        "streamrl_learner_truncated_fraction",
        "streamrl_learner_effective_sample_size",
        "streamrl_learner_clip_fraction",
        "streamrl_buffer_rollouts",
        "streamrl_buffer_groups",
        "streamrl_buffer_incomplete_groups",
        "streamrl_buffer_producers_blocked_seconds_total",
        "streamrl_generator_weight_fetch_seconds_bucket",
        "streamrl_generator_weight_load_seconds_bucket",
        "streamrl_generator_policy_version",
        "streamrl_learner_busy_ratio",
        "streamrl_generator_useful_ratio",
        "streamrl_buffer_credits_outstanding",
        "streamrl_feedback_labels_total",
        "streamrl_feedback_human_model_version",
        "streamrl_feedback_label_to_model_seconds_bucket",
        "streamrl_scorer_feed_sent_total",
    ] + [f"streamrl_{s}_messages_rejected_total" for s in ("generator", "scorer", "buffer", "learner")]
    used = set().union(*(metric_names(e) for _, e in queries(load_dashboard())))
    assert not set(wanted) - used, set(wanted) - used
    assert "sum by (process, reason)" in exprs


def test_every_query_selects_a_metric_and_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make setup` (apt-get install prometheus)")
    qs = queries(load_dashboard())
    assert len(qs) >= 30
    for title, expr in qs:
        assert metric_names(expr), (title, expr)
    # promtool parses every expression when it checks a rule file with one recording rule per query
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": to_prometheus(expr)} for i, (_, expr) in enumerate(qs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(qs)} rules found" in result.stdout


def test_promtool_rejects_a_broken_expression(tmp_path):
    """The check above can fail: a query with an unbalanced parenthesis does not pass."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make setup` (apt-get install prometheus)")
    path = tmp_path / "bad.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "g",
                        "rules": [{"record": "bad:query", "expr": "sum(rate(streamrl_generator_rollouts_total[1m])"}],
                    }
                ]
            }
        )
    )
    assert subprocess.run([promtool, "check", "rules", str(path)], capture_output=True).returncode != 0
