"""Experiment tracking: TensorBoard event files read back with TensorBoard's own reader,
hyperparameters included; a resumed learner purges the rolled-back steps; W&B gets the same."""

from __future__ import annotations

import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from streamrl.common.config import load_config
from streamrl.common.tracking import TENSORBOARD_DIR, Tracker, flat_hparams, tag
from streamrl.runs import resolved_config


def records(steps):
    return [
        {
            "step": s,
            "version": s,
            "time": 1.7e9 + s,
            "reward_mean": 0.1 * s,
            "kl": 0.01 * s,
            "loss/policy": -s,
            "clip_fraction": 0.05,
            "importance_ratio_max": 1.5,
            "samples": [{"prompt": "x"}],
            "tokens": 64,
            "behaviour_versions": [s - 1],
            "entropy": float("nan"),
        }
        for s in steps
    ]


def read(folder):
    events = EventAccumulator(str(folder / TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_every_numeric_value_is_a_scalar_read_back_by_tensorboard(tmp_path):
    cfg = load_config(None, [f'run.output_dir="{tmp_path}"', "learner.lr=3e-6", 'run.name="tb-test"'])
    tracker = Tracker(tmp_path, hparams=resolved_config(cfg))
    for record in records(range(1, 4)):
        tracker.log(record)
    tracker.close()
    events = read(tmp_path)
    tags = set(events.Tags()["scalars"])
    assert tags == {
        "reward/mean",
        "kl/per_token",
        "loss/policy",
        "policy/clip_fraction",
        "ratio/importance_ratio_max",
        "throughput/tokens",
    }  # not step/version/time, lists or NaN
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("reward/mean")] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert [e.value for e in events.Scalars("loss/policy")] == [-1.0, -2.0, -3.0]
    # hyperparameters: the HParams plugin's session-start record holds the flattened config
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = {k: v.ListFields()[0][1] for k, v in start.session_start_info.hparams.items()}
    assert hparams["learner.lr"] == pytest.approx(3e-6) and hparams["run.name"] == "tb-test"
    assert hparams["scorer.rewards"].startswith("[{'function': 'streamrl.services.scorer.rewards:vader_sentiment'")
    assert "learner.total_steps = 100" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_a_resumed_learner_drops_the_rolled_back_steps(tmp_path):
    tracker = Tracker(tmp_path, hparams={})
    for record in records(range(1, 6)):  # steps 4 and 5 were never checkpointed ...
        tracker.log(record)
    tracker.close()
    resumed = Tracker(tmp_path, hparams={}, start_step=3)  # ... the learner resumes from step 3
    for record in records(range(4, 6)):
        record["reward_mean"] += 10
        resumed.log(record)
    resumed.close()
    curve = [(e.step, round(e.value, 6)) for e in read(tmp_path).Scalars("reward/mean")]
    assert curve == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 10.4), (5, 10.5)]


def test_tags_and_flat_hparams():
    assert [
        tag(k)
        for k in (
            "loss/value",
            "kl",
            "kl_coef",
            "reward_mean",
            "clip_fraction",
            "ess_fraction",
            "samples_per_second",
            "wait_data_s",
            "staleness_max",
            "mystery",
        )
    ] == [
        "loss/value",
        "kl/per_token",
        "kl/coef",
        "reward/mean",
        "policy/clip_fraction",
        "ratio/ess_fraction",
        "throughput/samples_per_second",
        "time/wait_data_s",
        "staleness/staleness_max",
        "other/mystery",
    ]
    assert flat_hparams({"a": {"b": 1, "c": None, "d": [1, 2]}, "e": True}) == {
        "a.b": 1,
        "a.c": "unset",
        "a.d": "[1, 2]",
        "e": True,
    }


def test_wandb_gets_the_config_and_every_step(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(
        init=lambda **kwargs: calls.append(("init", kwargs)) or Run(), Settings=lambda **kwargs: kwargs
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = Tracker(
        tmp_path,
        hparams={"learner": {"lr": 1e-5}},
        run_name="demo",
        wandb=True,
        wandb_project="proj",
        wandb_entity="team",
    )
    tracker.log(records([1])[0])
    tracker.close()
    (_, init), (_, step, values), finish = calls
    assert init["mode"] == "offline" and init["project"] == "proj" and init["entity"] == "team"
    assert init["name"] == "demo" and init["config"] == {"learner": {"lr": 1e-5}} and init["resume"] == "allow"
    assert init["dir"] == str(tmp_path) and init["id"].startswith("streamrl-")
    assert step == 1 and values["reward/mean"] == pytest.approx(0.1) and finish == ("finish",)


@pytest.mark.slow
def test_wandb_offline_writes_a_run_without_network(tmp_path):
    pytest.importorskip("wandb")
    tracker = Tracker(tmp_path, hparams={"learner": {"lr": 1e-5}}, wandb=True)
    tracker.log(records([1])[0])
    tracker.close()
    [run] = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run.glob("run-streamrl-*.wandb"))[0].stat().st_size > 0
