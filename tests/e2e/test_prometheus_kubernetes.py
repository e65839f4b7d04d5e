"""deploy/prometheus-kubernetes.yml's relabel rules, run by a real Prometheus on pod metadata.

Debian's Prometheus has no Kubernetes discovery, and no cluster is here, so the pods' discovery
labels (``__meta_kubernetes_*``, what Kubernetes discovery attaches to each pod) come from a
file_sd file instead; everything after discovery (keep, address, job, service, process) is the
shipped rules. Real metrics endpoints stand in for the pods.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest
import yaml

from streamrl.common.metrics import ServiceMetrics
from streamrl.testing import free_port, stop_process, wait_until
from support import REPO

pytestmark = pytest.mark.slow


def pod(name: str, component: str, port: int, *, scrape: str = "true", path: str | None = None) -> dict:
    labels = {
        "__meta_kubernetes_namespace": "streamrl",
        "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_ip": "127.0.0.1",
        "__meta_kubernetes_pod_label_app_kubernetes_io_component": component,
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": scrape,
        "__meta_kubernetes_pod_annotation_prometheus_io_port": str(port),
    }
    if path:
        labels["__meta_kubernetes_pod_annotation_prometheus_io_path"] = path
    return {"targets": ["pod-ip:1"], "labels": labels}  # replaced by pod ip:annotated port


def test_pods_are_scraped_on_their_annotated_port_with_job_service_and_process(tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus binary is not on PATH: run `make test` (installs the Debian package prometheus)")
    scorer, generator = ServiceMetrics("scorer", "streamrl-scorer-6b8d-kq2vx"), ServiceMetrics("generator", "g")
    sport, gport = scorer.serve("127.0.0.1", 0), generator.serve("127.0.0.1", 0)
    other = free_port()
    pods = [
        pod("streamrl-scorer-6b8d-kq2vx", "scorer", sport),
        pod("streamrl-generator-7c9d-x2k4q", "generator", gport, path="/metrics"),
        pod("streamrl-generator-7c9d-off", "generator", other, scrape="false"),  # not annotated for scraping
        pod("someone-elses-app", "web", other),
    ]  # not a streamrl component
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "pods.json").write_text(json.dumps(pods))
    config = yaml.safe_load((REPO / "deploy" / "prometheus-kubernetes.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    (job,) = config["scrape_configs"]
    del job["kubernetes_sd_configs"]
    job["file_sd_configs"] = [{"files": ["targets/*.json"], "refresh_interval": "1s"}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    prom = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def up() -> list[dict]:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": "up"})
        try:
            return json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]["result"]
        except OSError:
            return []

    try:
        assert wait_until(
            lambda: len(up()) == 2 and all(r["value"][1] == "1" for r in up()), timeout=60, interval=1.0
        ), (up(), (tmp_path / "prometheus.log").read_text())
        seen = sorted(
            (
                r["metric"]["job"],
                r["metric"]["service"],
                r["metric"]["process"],
                r["metric"]["instance"],
                r["metric"]["namespace"],
            )
            for r in up()
        )
        assert seen == [
            ("streamrl-generator", "generator", "streamrl-generator-7c9d-x2k4q", f"127.0.0.1:{gport}", "streamrl"),
            ("streamrl-scorer", "scorer", "streamrl-scorer-6b8d-kq2vx", f"127.0.0.1:{sport}", "streamrl"),
        ]
    finally:
        stop_process(prom)
