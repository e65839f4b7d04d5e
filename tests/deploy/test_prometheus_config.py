"""deploy/prometheus.yml: valid for promtool and scraping exactly the ports the services serve on."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from streamrl.common.config import validate_config
from streamrl.status import targets
from support import REPO

SHIPPED = REPO / "deploy" / "prometheus.yml"


def test_promtool_accepts_the_shipped_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make setup` (apt-get install prometheus)")
    result = subprocess.run([promtool, "check", "config", str(SHIPPED)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_targets_are_the_default_metrics_ports_of_two_scorers_and_four_generators():
    config = yaml.safe_load(SHIPPED.read_text())
    scraped = {}
    for job in config["scrape_configs"]:
        service = job["job_name"].removeprefix("streamrl-")
        for static in job["static_configs"]:
            assert static["labels"]["service"] == service
            for target in static["targets"]:
                scraped[static["labels"]["process"]] = (service, target)
    cfg = validate_config({"endpoints": {"scorers": ["tcp://127.0.0.1:5550", "tcp://127.0.0.1:5551"]}})
    expected = {t.name: (t.service, f"{cfg.metrics.host}:{t.port}") for t in targets(cfg, generators=4)}
    assert scraped == expected
