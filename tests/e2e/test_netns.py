"""Multi-host, proven: a run across Linux network namespaces joined by veth pairs, on non-loopback
addresses with host names and CURVE keys; a partition of the trainer host for 20 s; a generator
host that joins mid-run and leaves.

Hosts (one network namespace each, addresses in 198.18.0.0/24, the benchmarking range, only on
the veth links this test creates, all plugged into a bridge in a switch namespace):

* ``trainer`` 198.18.0.1: learner + buffer (binds ``tcp://*:PORT``);
* ``scorer`` 198.18.0.2: one scorer;
* ``gen`` 198.18.0.3: two generators (``--index 0/1``, named ``gen-c-<i>``);
* ``late`` 198.18.0.4: one generator that joins mid-run and leaves;
* this test's own namespace 198.18.0.254 reads the metrics.

Every namespace resolves ``trainer`` and ``scorer`` through its own ``/etc/netns/<ns>/hosts`` (what
``ip netns exec`` mounts over ``/etc/hosts``), so the config's connect addresses are host names.
At the end the ledger balances: every rollout the buffer accepted was trained, dropped as stale,
evicted or is still held, none twice; versions only went up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from streamrl.common.modes import FsyncPolicy
from streamrl.common.security import generate_keys
from streamrl.services.buffer.journal import Journal
from streamrl.testing import local_run_config, stop_process, wait_until, write_config

pytestmark = pytest.mark.slow

NET = "198.18.0"
HOSTS = {"trainer": 1, "scorer": 2, "gen": 3, "late": 4}
OUTAGE_S = 20


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr}"


@pytest.fixture
def network():
    """The namespaces, veth pairs and bridge; ``{host: namespace name}``. Removed afterwards."""
    if shutil.which("ip") is None:
        pytest.fail("iproute2 is missing: run `make test` (it installs iproute2 with apt-get)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    tag = f"srl{os.getpid() % 100000}"
    names = {host: f"{tag}-{host}" for host in HOSTS}
    switch, root_link = f"{tag}-sw", f"{tag}r"
    created: list[str] = []
    try:
        ip("netns", "add", switch)
        created.append(switch)
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        for host, number in HOSTS.items():
            ns = names[host]
            ip("netns", "add", ns)
            created.append(ns)
            folder = Path("/etc/netns") / ns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(f"127.0.0.1 localhost\n{NET}.1 trainer\n{NET}.2 scorer\n")
            inside, outside = f"{tag}{number}h", f"{tag}{number}s"
            ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            ip("link", "set", inside, "netns", ns)
            ip("link", "set", outside, "netns", switch)
            ip("-n", ns, "addr", "add", f"{NET}.{number}/24", "dev", inside)
            ip("-n", ns, "link", "set", inside, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", switch, "link", "set", outside, "master", "br0")
            ip("-n", switch, "link", "set", outside, "up")
        ip("link", "add", root_link, "type", "veth", "peer", "name", f"{tag}0s")  # this test reads metrics
        ip("link", "set", f"{tag}0s", "netns", switch)
        ip("addr", "add", f"{NET}.254/24", "dev", root_link)
        ip("link", "set", root_link, "up")
        ip("-n", switch, "link", "set", f"{tag}0s", "master", "br0")
        ip("-n", switch, "link", "set", f"{tag}0s", "up")
        yield {"hosts": names, "switch": switch, "uplink": {host: f"{tag}{n}s" for host, n in HOSTS.items()}}
    finally:
        subprocess.run(["ip", "link", "del", root_link], capture_output=True)
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


class Hosts:
    """Service processes started inside the namespaces (``ip netns exec``: the pid is the service's)."""

    def __init__(self, config: Path, logs: Path, names: dict[str, str]):
        self.config, self.logs, self.names = config, logs, names
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, host: str, service: str, name: str, *args: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", STREAMRL_REPLICA=name)
        self.procs[name] = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.names[host],
                sys.executable,
                "-m",
                f"streamrl.services.{service}",
                "--config",
                str(self.config),
                *args,
            ],
            cwd=self.logs,
            env=env,
            stdout=open(self.logs / f"{name}.log", "ab"),
            stderr=subprocess.STDOUT,
        )

    def stop(self, name: str, timeout: float = 60.0) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc, 1)
            return proc.returncode

    def text(self) -> str:
        return "\n".join(
            f"===== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.logs.glob("*.log"))
        )


def trained(run_dir: Path) -> dict[int, list[str]]:
    path = run_dir / "trained.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {record["step"]: record["rollout_ids"] for record in map(json.loads, lines)}


def last_step(run_dir: Path) -> int:
    return max(trained(run_dir), default=0)


def metric(host: str, port: int, name: str) -> float | None:
    try:
        body = urllib.request.urlopen(f"http://{NET}.{HOSTS[host]}:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    values = [float(line.split()[-1]) for line in body.splitlines() if line.startswith(name + " ")]
    return values[0] if values else None


def test_run_across_hosts_survives_a_partition_and_a_host_joining_and_leaving(network, tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    sections = local_run_config(
        tmp_path,
        tiny_model_dir,
        run={"max_staleness": 2},
        transport={"announce_interval_s": 0.2, "request_timeout_s": 1.0},
        buffer={"capacity_groups": 8, "group_timeout_s": 10.0, "keep_history": True},
        learner={"total_steps": 1_000_000, "batch_timeout_s": 300.0, "checkpoint_every": 5},
    )
    sections["endpoints"] = {
        "scorers": ["tcp://scorer:5550"],
        "buffer": "tcp://trainer:5560",
        "batches": "tcp://trainer:5561",
        "weights_announce": "tcp://trainer:5570",
        "weights": "tcp://trainer:5571",
        "resolve_interval_s": 1.0,
        "bind": {
            "scorer": "tcp://*:5550",
            "buffer": "tcp://*:5560",
            "batches": "tcp://*:5561",
            "weights_announce": "tcp://*:5570",
            "weights": "tcp://*:5571",
        },
    }
    sections["metrics"] = {"host": "0.0.0.0"}  # default ports: each host has its own
    generate_keys(tmp_path / "keys")
    sections["security"] = {"keys_dir": str(tmp_path / "keys")}
    logs = tmp_path / "logs"
    logs.mkdir()
    hosts = Hosts(write_config(tmp_path / "run.toml", sections), logs, network["hosts"])
    try:
        hosts.start("trainer", "buffer", "buffer-trainer")
        hosts.start("trainer", "learner", "learner-trainer")
        hosts.start("scorer", "scorer", "scorer-b")
        for i in range(2):
            hosts.start("gen", "generator", f"gen-c-{i}", "--index", str(i))
        assert wait_until(lambda: last_step(run_dir) >= 3, timeout=240, interval=1.0), hosts.text()
        # the generators, in another namespace, are reached over the bridge on their own metrics ports
        assert all((metric("gen", 9100 + i, "streamrl_generator_rollouts_total") or 0) > 0 for i in range(2))

        # a generator host joins; its rollouts are trained; it leaves
        hosts.start("late", "generator", "gen-d-0")
        assert wait_until(
            lambda: any(i.startswith("gen-d-0-") for ids in trained(run_dir).values() for i in ids),
            timeout=240,
            interval=1.0,
        ), hosts.text()
        assert hosts.stop("gen-d-0", 60) == 0, hosts.text()
        left_at = last_step(run_dir)
        assert wait_until(lambda: last_step(run_dir) >= left_at + 3, timeout=240, interval=1.0), hosts.text()

        # the trainer host drops off the network for 20 s: training stops, then resumes
        ip("-n", network["switch"], "link", "set", network["uplink"]["trainer"], "down")
        time.sleep(3)
        cut_at = last_step(run_dir)
        time.sleep(OUTAGE_S - 3)
        during = last_step(run_dir)
        ip("-n", network["switch"], "link", "set", network["uplink"]["trainer"], "up")
        # what the buffer held when the link went down is at most max_staleness steps' worth; nothing new arrives
        assert during - cut_at <= 3, "the learner kept training with its host off the network"
        assert wait_until(lambda: last_step(run_dir) >= during + 5, timeout=240, interval=1.0), hosts.text()

        assert hosts.stop("learner-trainer") == 0, hosts.text()  # a clean stop: final checkpoint
        for name in ("gen-c-0", "gen-c-1", "scorer-b", "buffer-trainer"):
            assert hosts.stop(name) == 0, (name, hosts.text())
    finally:
        for name in list(hosts.procs):
            stop_process(hosts.procs[name], 10)

    versions = [json.loads(line)["version"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    steps = trained(run_dir)
    assert sorted(steps) == list(range(1, max(steps) + 1))
    ids = [i for batch in steps.values() for i in batch]
    assert len(ids) == len(set(ids)), "a rollout was trained twice"
    # rollout id = "<instance>-<uuid>:<group>:<member>": every generator's rollouts were trained
    assert {i.split(":")[0].rsplit("-", 1)[0] for i in ids} == {"gen-c-0", "gen-c-1", "gen-d-0"}
    journal = Journal(run_dir / "buffer", fsync=FsyncPolicy.NEVER)
    events: dict[str, set[str]] = {}
    for event, rollout_ids in journal.history():
        events.setdefault(event, set()).update(rollout_ids)
    recovered = journal.recover()
    held = {m.rollout.rollout_id for g in recovered.groups for m in g.members}
    # served and trained, not acknowledged: the learner's last step before its clean stop
    served = {s.rollout.rollout_id for h in recovered.held for s in h.batch.rollouts}
    accepted, done = events["accepted"], set(ids)
    dropped, evicted = events.get("dropped_stale", set()), events.get("evicted", set())
    assert done <= accepted and not accepted - (done | dropped | evicted | held | served)
    assert not held & (done | dropped | evicted | served) and not (done | served) & (dropped | evicted)
