"""A real Prometheus scrapes a short real run with the shipped deploy/prometheus.yml.

One run (learner, buffer, scorer, 2 generators on loopback with fresh ports) and one
``prometheus`` process serve every test of this module. The scrape config is the
shipped file (file-based discovery) with a 1 s scrape interval, reading a targets file
that ``streamrl targets`` code wrote for the run's config.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from promql import load_dashboard, metric_names, queries, to_prometheus
from streamrl.common.config import load_config
from streamrl.status import file_sd, targets
from streamrl.testing import feedback_sections, free_port, local_run_config, stop_process, wait_until, write_config
from support import REPO

pytestmark = pytest.mark.slow

GENERATORS, SCORERS = 2, 1
PROCESSES = {"learner-0", "buffer-0", "scorer-0", "generator-0", "generator-1", "feedback-0"}


def run_scrape_config(folder, cfg, generators: int) -> dict:
    """deploy/prometheus.yml with a 1 s interval, and ``folder/targets/run.json`` written as ``streamrl targets``
    writes it for the run's config (its ports) and ``generators`` generators."""
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    (folder / "targets").mkdir()
    (folder / "targets" / "run.json").write_text(json.dumps(file_sd(targets(cfg, generators))))
    return config


def query(port: int, expr: str) -> list[dict]:
    """The result vector of an instant query through Prometheus' HTTP API.

    Raises:
        AssertionError: Prometheus answered with an error (e.g. a bad expression).
    """
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    except urllib.error.HTTPError as err:
        body = json.loads(err.read())
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def by_process(result: list[dict]) -> dict[str, float]:
    return {r["metric"].get("process", ""): float(r["value"][1]) for r in result}


@pytest.fixture(scope="module")
def prometheus_run(tmp_path_factory, tiny_model_dir):
    """``(prometheus port, run tmp dir)`` once the learner has trained and Prometheus scraped it."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus binary is not on PATH: run `make setup` (installs the Debian package prometheus)")
    from streamrl.testing import Services

    tmp = tmp_path_factory.mktemp("prometheus_run")
    sections = feedback_sections(
        local_run_config(tmp, tiny_model_dir, scorers=SCORERS, learner={"total_steps": 1000}),
        combination="reward_shaping",
    )  # the feedback service too: the dashboard reads it
    procs = Services(write_config(tmp / "run.toml", sections), tmp)
    prom = None
    try:
        for name in ("learner", "buffer", "scorer", "feedback"):
            procs.start(name)
        for i in range(GENERATORS):
            procs.start("generator", i)
        config = run_scrape_config(tmp, load_config(tmp / "run.toml"), GENERATORS)
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        prom_log = open(tmp / "prometheus.log", "wb")
        prom = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=prom_log,
            stderr=subprocess.STDOUT,
        )

        def trained_and_scraped() -> bool:
            try:
                step = by_process(query(port, "streamrl_learner_step"))
            except OSError:
                return False
            return step.get("learner-0", 0) >= 2

        ok = wait_until(trained_and_scraped, timeout=150, interval=1.0)
        assert ok, procs.logs() + "\n===== prometheus\n" + (tmp / "prometheus.log").read_text()
        time.sleep(2)  # a few more scrapes, so that every rate() has two samples after the first step
        yield port, procs
    finally:
        if prom is not None:
            stop_process(prom)
        procs.close()


def test_every_service_target_is_up_and_rollouts_flow(prometheus_run):
    port, procs = prometheus_run
    up = query(port, 'up{job=~"streamrl-.*"}')
    assert by_process(up) == {name: 1.0 for name in PROCESSES}, up
    assert {r["metric"]["job"] for r in up} == {
        "streamrl-learner",
        "streamrl-buffer",
        "streamrl-scorer",
        "streamrl-generator",
        "streamrl-feedback",
    }
    rate = query(port, "sum(rate(streamrl_generator_rollouts_total[30s]))")
    assert len(rate) == 1 and float(rate[0]["value"][1]) > 0, rate
    per_generator = by_process(query(port, "increase(streamrl_generator_rollouts_total[1m])"))
    assert set(per_generator) == {"generator-0", "generator-1"} and all(v > 0 for v in per_generator.values())
    learner = query(port, "streamrl_learner_samples_total")
    assert len(learner) == 1 and float(learner[0]["value"][1]) >= 2 * 2 * 4, learner  # >= 2 steps of 2 groups of 4
    assert learner[0]["metric"]["service"] == "learner"


def test_every_dashboard_query_reads_exported_metrics_and_returns_data(prometheus_run):
    port, _ = prometheus_run
    url = f"http://127.0.0.1:{port}/api/v1/label/__name__/values"
    exported = set(json.loads(urllib.request.urlopen(url, timeout=5).read())["data"])
    assert "streamrl_generator_rollouts_total" in exported and "up" in exported
    missing, empty = {}, []
    for title, expr in queries(load_dashboard()):
        names = metric_names(expr)
        assert names, (title, expr)
        if names - exported:
            missing[expr] = names - exported
        elif not query(port, to_prometheus(expr)):
            empty.append((title, expr))
    assert not missing, f"dashboard metrics no service exports: {missing}"
    assert not empty, f"dashboard queries without a series: {empty}"


def lint(promtool: str, exposition: bytes) -> list[str]:
    """``promtool check metrics`` problems (``name problem`` lines) about streamrl metrics."""
    result = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True)
    lines = result.stdout.decode().splitlines() + result.stderr.decode().splitlines()
    return [line for line in lines if line.startswith("streamrl_")]


def test_every_endpoint_passes_promtool_metric_lint(prometheus_run):
    """``promtool check metrics`` (naming conventions: _total counters, base units) on each exposition."""
    port, _ = prometheus_run
    promtool = shutil.which("promtool")
    bad = (
        b"# HELP streamrl_x_wait_milliseconds w\n# TYPE streamrl_x_wait_milliseconds counter\n"
        b"streamrl_x_wait_milliseconds 1\n"
    )
    assert len(lint(promtool, bad)) == 2  # no _total suffix, not a base unit: the lint can fail
    targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5).read())
    urls = [t["scrapeUrl"] for t in targets["data"]["activeTargets"]]
    assert len(urls) == len(PROCESSES)
    for url in urls:
        exposition = urllib.request.urlopen(url, timeout=5).read()
        assert b"streamrl_" in exposition
        assert not lint(promtool, exposition), (url, lint(promtool, exposition))
