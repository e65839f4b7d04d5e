"""The data-parallel learner: 2 gloo ranks started by torchrun take the same
step as one rank on the same batch; the loss normalisation rule; the batch broadcast."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from streamrl.common.config import LearnerSection
from streamrl.common.lora import apply_lora
from streamrl.common.messages import SamplingParams
from streamrl.common.models import build_char_tokenizer, build_tiny_model
from streamrl.common.modes import LossAggregation
from streamrl.services.learner.batch import collate
from streamrl.services.learner.distributed import loss_normaliser
from streamrl.services.learner.losses import aggregate_tokens
from streamrl.services.learner.trainer import PPOTrainer
from streamrl.testing import free_port
from support import scored_item

TESTS = Path(__file__).parents[2]  # support.py
TOKENIZER = build_char_tokenizer()
# completions of very different lengths: the shards of a minibatch hold different token counts, so a
# mean of per-shard token means would differ from the single-rank step
TEXTS = [
    ("Hi", "there friend, a long reply"),
    ("Hi", "yo"),
    ("A much longer prompt here", "ok!"),
    ("A much longer prompt here", "not ok at all, no"),
    ("Q:", "x"),
    ("Q:", "an answer of some length"),
    ("Tell", "abc"),
    ("Tell", "a b c d e f g h i"),
    ("Why", "because"),
    ("Why", "b"),
]
CASES = {
    "grpo-token-mean": dict(
        advantage="grpo",
        minibatches=2,
        ppo_epochs=2,
        loss_aggregation="token_mean",
        kl_coef=0.1,
        kl_penalty="loss",
        kl_estimator="k3",
    ),
    "gae-sequence-mean": dict(
        advantage="gae", minibatches=1, ppo_epochs=2, loss_aggregation="sequence_mean", reuse_first_pass=False
    ),
    "rloo-fixed-length-buckets": dict(
        advantage="rloo", minibatches=2, ppo_epochs=1, bucket_by_length=True, loss_aggregation="fixed_length_sum"
    ),
    # a LoRA policy: DDP averages the adapters' gradients only; the reference is the base, adapters disabled
    "grpo-lora": dict(advantage="grpo", minibatches=2, ppo_epochs=1, kl_coef=0.1, lora={"rank": 4, "alpha": 8.0}),
}


def batch(weights: bool = False):
    """The texts as 5 groups of 2 (rewards 0 and 1), behaviour log-prob -2.5 per token."""
    items = []
    for i, (prompt, completion) in enumerate(TEXTS):
        item = scored_item(f"g{i // 2}", i % 2)
        tokens = [
            np.asarray(TOKENIZER(x, add_special_tokens=False)["input_ids"], np.int32) for x in (prompt, completion)
        ]
        item.rollout.prompt_tokens, item.rollout.completion_tokens = tokens
        item.rollout.behaviour_logprobs = np.full(len(tokens[1]), -2.5, np.float32)
        item.rollout.sampling = SamplingParams(temperature=0.9, top_p=1.0, max_new_tokens=32)
        items.append(item)
    tb = collate(items, pad_id=TOKENIZER.pad_token_id)
    if weights:
        tb.weights = torch.linspace(0.5, 1.5, tb.size)
    return tb


def config(case: str, world_size: int) -> LearnerSection:
    return LearnerSection(lr=1e-2, device="cpu", world_size=world_size, **CASES[case])


def policy_and_reference(cfg: LearnerSection):
    """The tiny policy and its frozen reference; with ``cfg.lora`` the PEFT policy (adapters initialised from
    the global RNG: seed it the same on every rank) and None (the base with adapters disabled)."""
    policy = build_tiny_model(TOKENIZER, seed=0)
    if cfg.lora is not None:
        return apply_lora(policy, cfg.lora), None
    return policy, build_tiny_model(TOKENIZER, seed=1)


def two_steps(trainer_factory, cfg: LearnerSection):
    """Two learner steps (the second one from the first's optimizer state) with fixed RNG."""
    torch.manual_seed(0)
    trainer = trainer_factory(*policy_and_reference(cfg))
    stats = []
    for version in range(2):
        torch.manual_seed(7 + version)
        stats.append(trainer.step(batch(weights=True), current_version=version))
    return trainer, stats


def rank_main(out: Path) -> None:
    """One torchrun rank: every case on 2 ranks; rank 0 writes the weights and stats."""
    from streamrl.services.learner.distributed import DistributedPPOTrainer, broadcast_batch, init_distributed

    torch.set_num_threads(1)
    dist, device = init_distributed(config("grpo-token-mean", 2), torch.device("cpu"))
    rank = dist.rank
    # the broadcast: rank 1 receives exactly rank 0's batch, optional fields included
    want = batch(weights=True)
    want.ref_logprobs = -torch.arange(want.mask.numel()).reshape(want.mask.shape).float() / 100 * want.mask
    want.advantage_bonus = torch.linspace(-1, 1, want.size)  # Q-augmentation's [B] bonus
    op, got, version = broadcast_batch(dist, want if rank == 0 else None, 5)
    if rank == 1:
        assert (op, version, got.sampling) == (1, 5, want.sampling)
        for name, tensor in want._tensors().items():
            assert torch.equal(getattr(got, name), tensor), name

    class Counting(DistributedPPOTrainer):  # the rows this rank trains on (forward passes with gradients)
        rows = 0

        def _forward(self, mb):
            Counting.rows += mb.size
            return super()._forward(mb)

    class Unscaled(Counting):  # the negative control: DDP's plain mean of per-shard losses
        def _backward(self, loss, mb):
            loss.backward()

    for case in [*CASES, "unscaled"]:
        cfg = config("grpo-token-mean" if case == "unscaled" else case, 2)
        kind = Unscaled if case == "unscaled" else Counting
        Counting.rows = 0
        if rank == 0:
            trainer, stats = two_steps(lambda p, r, kind=kind, cfg=cfg: kind(p, r, cfg, dist), cfg)
            trainer.close(end=False)
            torch.save(
                {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}
                | (
                    {"value_head." + k: v for k, v in trainer.value_head.state_dict().items()}
                    if trainer.value_head is not None
                    else {}
                ),
                out / f"{case}.pt",
            )
            (out / f"{case}.json").write_text(json.dumps({"stats": stats, "rows": Counting.rows}))
        else:
            torch.manual_seed(0)
            trainer = kind(*policy_and_reference(cfg), cfg, dist)
            assert trainer.serve() == 2
    del trainer  # DDP's reducer before the process group: exiting with it alive can hang in gloo's threads
    gc.collect()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_take_the_single_rank_step(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(map(str, (Path(__file__).parent, TESTS))))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            f"--master-port={free_port()}",
            __file__,
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for case in CASES:
        trainer, single = two_steps(lambda p, r, case=case: PPOTrainer(p, r, config(case, 1)), config(case, 1))
        want = dict(trainer.policy.state_dict())
        if trainer.value_head is not None:
            want |= {"value_head." + k: v for k, v in trainer.value_head.state_dict().items()}
        got = torch.load(tmp_path / f"{case}.pt", weights_only=True)
        assert set(got) == set(want)
        for name, value in want.items():
            # Adam divides by sqrt(v): float noise in a near-zero gradient moves its weight by up to ~1e-4 of lr
            torch.testing.assert_close(got[name], value, atol=2e-4, rtol=1e-3, msg=f"{case}: {name}")
        torch.manual_seed(0)
        initial = policy_and_reference(config(case, 1))[0].state_dict()
        moved = max(float((want[name] - value).abs().max()) for name, value in initial.items())
        assert moved > 1e-3, f"{case}: the steps did not move the weights; the comparison would be empty"
        record = json.loads((tmp_path / f"{case}.json").read_text())
        stats = record["stats"]
        # sharded: rank 0 ran forward/backward on rows[0::2] of each minibatch (2 steps x ppo_epochs passes)
        sizes = [len(rows) for rows in torch.arange(len(TEXTS)).tensor_split(CASES[case]["minibatches"])]
        assert record["rows"] == 2 * CASES[case]["ppo_epochs"] * sum((size + 1) // 2 for size in sizes)
        for step_stats, single_stats in zip(stats, single):
            for key in ("kl", "reward_mean", "grad_norm", "samples", "tokens", "staleness_mean", "skipped_updates"):
                assert step_stats[key] == pytest.approx(single_stats[key], rel=2e-5, abs=1e-6), (case, key)
    # without the N * D_r / D rescaling the averaged gradient is another one (the shards' token counts differ)
    unscaled = json.loads((tmp_path / "unscaled.json").read_text())["stats"]
    _, single = two_steps(lambda p, r: PPOTrainer(p, r, config("grpo-token-mean", 1)), config("grpo-token-mean", 1))
    assert unscaled[0]["grad_norm"] != pytest.approx(single[0]["grad_norm"], rel=1e-2)


@pytest.mark.parametrize("aggregation", list(LossAggregation))
def test_rescaled_shard_losses_average_to_the_whole_minibatch_loss(aggregation):
    """The rule DDP's gradient average needs: N * (D_r / D) * L_r averaged over ranks is L; the plain
    average of the shard losses is not when shards hold different token counts."""
    torch.manual_seed(3)
    x = torch.randn(6, 9, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4, 0, 7, 2])
    mask = (torch.arange(9) < lengths[:, None]).float()
    whole = aggregate_tokens(x, mask, aggregation, max_tokens=12)
    shards = [torch.arange(6)[r::2] for r in range(2)]
    d = loss_normaliser(mask, aggregation)
    rescaled = [
        2 * loss_normaliser(mask[s], aggregation) / d * aggregate_tokens(x[s], mask[s], aggregation, max_tokens=12)
        for s in shards
    ]
    assert sum(rescaled) / 2 == pytest.approx(float(whole), rel=1e-12)
    assert sum(loss_normaliser(mask[s], aggregation) for s in shards) == d
    if aggregation is not LossAggregation.FIXED_LENGTH_SUM:  # equal rows per shard: there the plain mean is exact
        naive = sum(aggregate_tokens(x[s], mask[s], aggregation, max_tokens=12) for s in shards) / 2
        assert float(naive) != pytest.approx(float(whole), rel=1e-3)


if __name__ == "__main__":  # a torchrun rank of test_two_gloo_ranks_take_the_single_rank_step
    rank_main(Path(sys.argv[1]))
