"""``streamrl status`` / ``streamrl targets`` with remote targets: hosts from the config, file_sd files,
Kubernetes pods through the API server's proxy (a stand-in API server on loopback)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from streamrl.cli import main
from streamrl.common.config import validate_config
from streamrl.common.metrics import ServiceMetrics
from streamrl.status import file_sd, kubernetes_targets, parse_hosts, read_file_sd, render, targets
from streamrl.testing import write_config

CLUSTER = {
    "endpoints": {
        "scorers": ["tcp://scorer-a.lan:5550", "tcp://scorer-a.lan:5551", "tcp://10.0.0.7:5550"],
        "buffer": "tcp://trainer.lan:5560",
        "batches": "tcp://trainer.lan:5561",
        "weights_announce": "tcp://trainer.lan:5570",
        "weights": "tcp://trainer.lan:5571",
        "bind": {"buffer": "tcp://*:5560", "batches": "tcp://*:5561"},
    },
    "metrics": {"host": "0.0.0.0"},
    "security": {"allow_insecure": True},
}


def cli(argv: list[str]) -> int:
    """Exit status of ``streamrl ARGV``."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def rows(ts):
    return [(t.name, t.service, t.address) for t in ts]


def test_targets_follow_the_endpoint_hosts_and_the_generator_hosts():
    cfg = validate_config(CLUSTER)
    assert rows(targets(cfg, 0, parse_hosts("gen-a:2, gen-b"))) == [
        ("learner-0", "learner", "trainer.lan:9400"),
        ("buffer-0", "buffer", "trainer.lan:9300"),
        ("scorer-0", "scorer", "scorer-a.lan:9200"),  # two scorers on one host: ports base + 0, base + 1
        ("scorer-1", "scorer", "scorer-a.lan:9201"),
        ("scorer-2", "scorer", "10.0.0.7:9200"),
        ("generator-gen-a-0", "generator", "gen-a:9100"),
        ("generator-gen-a-1", "generator", "gen-a:9101"),
        ("generator-gen-b-0", "generator", "gen-b:9100"),
    ]
    local = validate_config({"metrics": {"host": "0.0.0.0"}})  # loopback endpoints: this machine
    assert rows(targets(local, 1)) == [
        ("learner-0", "learner", "127.0.0.1:9400"),
        ("buffer-0", "buffer", "127.0.0.1:9300"),
        ("scorer-0", "scorer", "127.0.0.1:9200"),
        ("generator-0", "generator", "127.0.0.1:9100"),
    ]
    for bad in ("gen-a:0", ":2", "gen-a:two"):
        with pytest.raises(ValueError, match="expected HOST or HOST:COUNT"):
            parse_hosts(bad)


def test_targets_command_writes_file_sd_that_status_reads_back(tmp_path, capsys):
    config = write_config(tmp_path / "cluster.toml", CLUSTER)
    out = tmp_path / "targets" / "cluster.json"
    out.parent.mkdir()
    assert cli(["targets", "--config", str(config), "--generator-hosts", "gen-a:2", "-o", str(out)]) == 0
    groups = json.loads(out.read_text())
    assert groups[0] == {"targets": ["trainer.lan:9400"], "labels": {"service": "learner", "process": "learner-0"}}
    assert rows(read_file_sd(out)) == rows(targets(validate_config(CLUSTER), 0, [("gen-a", 2)]))
    assert cli(["targets", "--config", str(config), "--generator-hosts", "gen-a:x"]) == 2
    assert "--generator-hosts 'gen-a:x': expected HOST or HOST:COUNT" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"targets": ["nohost"], "labels": {"service": "scorer"}}]))
    with pytest.raises(ValueError, match="target 'nohost' is not host:port"):
        read_file_sd(bad)


def test_status_reads_remote_targets_from_a_file(tmp_path, capsys, monkeypatch):
    scorer = ServiceMetrics("scorer", "scorer-0")
    port = scorer.serve("127.0.0.2", 0)  # another loopback address stands for another host
    scorer.counter("rollouts_scored_total", "s").inc(41)
    sd = tmp_path / "t.yml"  # YAML works too
    sd.write_text(
        f"- targets: ['127.0.0.2:{port}']\n  labels: {{service: scorer, process: scorer-b}}\n"
        "- targets: ['127.0.0.3:1']\n  labels: {service: buffer, process: buffer-0}\n"
        "- targets: ['127.0.0.4:1']\n  labels: {job: node}\n"
    )
    monkeypatch.setattr("streamrl.status.time.sleep", lambda seconds: None)
    assert cli(["status", "--targets", str(sd), "--interval", "0"]) == 0
    table = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(table) == {"scorer-b", "buffer-0"}
    assert table["scorer-b"].split()[1:3] == ["up", f"127.0.0.2:{port}"] and "41 scored" in table["scorer-b"]
    assert table["buffer-0"].split()[1] == "DOWN"


class FakeApiServer(ThreadingHTTPServer):
    """The two Kubernetes API paths status uses, as ``kubectl proxy`` serves them (no auth)."""

    def __init__(self, pods: list[dict], metrics: dict[str, bytes]):
        self.pods, self.metrics, self.paths = pods, metrics, []
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        server: FakeApiServer = self.server
        server.paths.append(self.path)
        if self.path == "/api/v1/namespaces/rl/pods?labelSelector=app.kubernetes.io%2Fpart-of%3Dstreamrl":
            body = json.dumps({"kind": "PodList", "items": server.pods}).encode()
        elif self.path in server.metrics:
            body = server.metrics[self.path]
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def k8s_pod(name: str, component: str, port: str, scrape: str = "true") -> dict:
    return {
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/component": component},
            "annotations": {"prometheus.io/scrape": scrape, "prometheus.io/port": port},
        },
        "status": {"podIP": "10.244.1.7"},
    }


def test_status_lists_kubernetes_pods_and_reads_them_through_the_api_proxy(capsys, monkeypatch):
    exposition = (
        b"# TYPE streamrl_generator_rollouts_total counter\nstreamrl_generator_rollouts_total 12\n"
        b"# TYPE streamrl_generator_policy_version gauge\nstreamrl_generator_policy_version 3\n"
    )
    pods = [
        k8s_pod("streamrl-generator-7c9d-x2k4q", "generator", "9100"),
        k8s_pod("streamrl-learner-0", "learner", "9400"),
        k8s_pod("streamrl-generator-7c9d-off", "generator", "9100", scrape="false"),
        k8s_pod("prometheus-0", "monitoring", "9090"),
    ]
    api = FakeApiServer(
        pods, {"/api/v1/namespaces/rl/pods/streamrl-generator-7c9d-x2k4q:9100/proxy/metrics": exposition}
    )
    threading.Thread(target=api.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{api.server_port}"
    try:
        ts = kubernetes_targets(url, "rl")
        assert rows(ts) == [
            ("streamrl-learner-0", "learner", "10.244.1.7:9400"),
            ("streamrl-generator-7c9d-x2k4q", "generator", "10.244.1.7:9100"),
        ]
        monkeypatch.setattr("streamrl.status.time.sleep", lambda seconds: None)
        assert cli(["status", "--kubernetes", url, "--namespace", "rl", "--interval", "0"]) == 0
        table = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
        assert table["streamrl-learner-0"].split()[1] == "DOWN"  # the proxy answered 404
        assert table["streamrl-generator-7c9d-x2k4q"].split()[1] == "up"
        assert "v3 (newest v0)  12 rollouts" in table["streamrl-generator-7c9d-x2k4q"]
    finally:
        api.shutdown()
        api.server_close()
    with pytest.raises(OSError, match="cannot list pods at .* fix: run `kubectl proxy`"):
        kubernetes_targets(url, "rl", timeout=1)


def test_render_names_each_target_by_its_address():
    cfg = validate_config({})
    table = render(cfg, 0, 0.0, ts=[]).splitlines()
    assert table == ["process       state address               detail"]
    assert file_sd([]) == []
