"""Mismatched models are refused: a generator whose tokenizer is a permutation of the
learner's (same size, same special ids, so no shape check can notice) refuses the learner's weights and
never generates; rollouts stamped with another model's fingerprint that reach the learner are refused
and counted, never trained."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import zmq

from streamrl.common.messages import encode
from streamrl.testing import local_run_config, scrape, wait_until, write_config
from support import permuted_char_tokenizer, scored_item

pytestmark = pytest.mark.slow


def rejected(samples: dict[str, float], reason: str) -> float:
    return sum(v for k, v in samples.items() if "messages_rejected_total" in k and f"reason={reason}" in k)


def metrics_or_empty(port: int) -> dict[str, float]:
    try:
        return scrape(port)
    except ConnectionError:
        return {}


def test_another_tokenizer_of_the_same_shape_is_refused_by_the_generator_and_the_learner(
    tmp_path, tiny_model_dir, services
):
    permuted = tmp_path / "permuted"
    shutil.copytree(tiny_model_dir, permuted)
    for path in permuted.glob("*token*"):
        path.unlink()
    permuted_char_tokenizer().save_pretrained(permuted)  # same weights, same shapes, another vocabulary
    sections = local_run_config(tmp_path, tiny_model_dir)
    procs = services(write_config(tmp_path / "run.toml", sections))
    procs.start("learner")
    procs.start("buffer")
    procs.start("generator", 0, "--set", f"model.path={permuted}")
    # the generator refuses the learner's weights and never samples
    port = sections["metrics"]["generator_port"]
    assert wait_until(lambda: rejected(metrics_or_empty(port), "model_mismatch") >= 1, timeout=120), procs.logs()
    assert wait_until(
        lambda: metrics_or_empty(port).get("streamrl_generator_waiting_seconds{on=weights}", 0) > 1, timeout=30
    ), procs.logs()
    log = (tmp_path / "generator-0.log").read_text()
    assert "model fingerprint" in log and "give every service the same model.path" in log
    assert "loaded policy version" not in log  # never loaded, so never sampled
    assert metrics_or_empty(port).get("streamrl_generator_rollouts_total", 0) == 0
    assert rejected(metrics_or_empty(port), "model_mismatch") == 1  # once per announced version, not per poll

    # rollouts stamped with another model's fingerprint that reach the learner are refused, never trained
    port = sections["metrics"]["learner_port"]
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(sections["endpoints"]["buffer"])
    try:
        for group in ("g1", "g2"):  # groups_per_step = 2: one batch of 2 x 2 rollouts of another model
            for k in range(2):
                item = scored_item(group, k)
                item.rollout.model_fingerprint = "0123456789abcdef"
                push.send_multipart(encode(item))
        assert wait_until(lambda: rejected(metrics_or_empty(port), "model_mismatch") == 4, timeout=60), procs.logs()
    finally:
        push.close(0)
        ctx.term()
    time.sleep(2)  # the learner told the buffer to forget that batch: it is not served (and refused) again
    assert rejected(metrics_or_empty(port), "model_mismatch") == 4
    assert not (tmp_path / "run" / "trained.jsonl").exists()  # nothing of it was trained
    refused = [json.loads(line) for line in (tmp_path / "run" / "refused.jsonl").read_text().splitlines()]
    assert [sorted(r["rollout_ids"]) for r in refused] == [["g1-0", "g1-1", "g2-0", "g2-1"]]
    assert "model fingerprint 0123456789abcdef != the learner's" in (tmp_path / "learner-0.log").read_text()
