"""deploy/prometheus.yml (file-based discovery) and deploy/prometheus-kubernetes.yml (pod discovery):
valid for promtool, and scraping exactly the ports and labels the services and ``streamrl status`` use."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from streamrl.common.config import validate_config
from streamrl.status import file_sd, read_file_sd, targets
from support import REPO

SHIPPED = REPO / "deploy" / "prometheus.yml"
LOCAL_TARGETS = REPO / "deploy" / "targets" / "local.json"
KUBERNETES = REPO / "deploy" / "prometheus-kubernetes.yml"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run `make test` (apt-get install prometheus)")
    return path


def test_promtool_accepts_the_shipped_config_and_its_targets():
    result = subprocess.run([promtool(), "check", "config", str(SHIPPED)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_job_per_service_reading_the_targets_folder():
    config = yaml.safe_load(SHIPPED.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {f"streamrl-{s}" for s in ("learner", "buffer", "scorer", "generator", "feedback")}
    for name, job in jobs.items():
        assert job["file_sd_configs"] == [{"files": ["targets/*.json"]}]
        assert job["relabel_configs"] == [
            {"source_labels": ["service"], "regex": name.removeprefix("streamrl-"), "action": "keep"}
        ]


def test_local_targets_are_the_default_ports_of_two_scorers_and_four_generators():
    cfg = validate_config(
        {"endpoints": {"scorers": ["tcp://127.0.0.1:5550", "tcp://127.0.0.1:5551"]}, "feedback": {"enabled": True}}
    )  # and the feedback page's service
    shipped = json.loads(LOCAL_TARGETS.read_text())
    assert shipped == file_sd(targets(cfg, generators=4))  # what `streamrl targets` writes
    by_process = {g["labels"]["process"]: (g["labels"]["service"], g["targets"]) for g in shipped}
    assert by_process["learner-0"] == ("learner", ["127.0.0.1:9400"])
    assert by_process["scorer-1"] == ("scorer", ["127.0.0.1:9201"])
    assert by_process["generator-3"] == ("generator", ["127.0.0.1:9103"])
    assert [(t.name, t.service, t.host, t.port) for t in read_file_sd(LOCAL_TARGETS)] == [
        (t.name, t.service, t.host, t.port) for t in targets(cfg, generators=4)
    ]


def test_kubernetes_config_keeps_annotated_streamrl_pods_and_names_them_like_status(tmp_path):
    config = yaml.safe_load(KUBERNETES.read_text())
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["streamrl"]}}]
    # Debian's promtool is built without Kubernetes discovery: check the rest of the file with it
    job["file_sd_configs"] = [{"files": ["targets/*.json"]}]
    del job["kubernetes_sd_configs"]
    check = tmp_path / "prometheus-kubernetes-check.yml"
    check.write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool(), "check", "config", str(check)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # tests/e2e/test_prometheus.py runs these relabel rules in a real Prometheus on fake pod metadata
