"""H-hat's features and head, the eligibility module and the TAMER+RL combination rules."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch

from streamrl.common.human import (
    HumanHead,
    beta_at,
    bias_actions,
    bias_actions_law,
    control_share,
    control_share_law,
    eligibility,
    human_terms,
    reference_features,
)
from streamrl.common.messages import (
    FinishReason,
    HumanModel,
    HumanScore,
    Rollout,
    SamplingParams,
    ScoredRollout,
    Selection,
)
from streamrl.common.models import build_char_tokenizer, build_tiny_model
from streamrl.common.modes import HumanCombination


def keep_probabilities(values, p):
    """Slow reference of P(J = j | candidates) under control sharing: (1-p)/K + p [j in argmax]/|argmax|."""
    k, best = len(values), [j for j, v in enumerate(values) if v == max(values)]
    return [(1 - p) / k + (p / len(best) if j in best else 0.0) for j in range(k)]


@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_control_share_weights_are_exactly_unbiased_by_enumeration(p):
    mu = np.array([0.5, 0.3, 0.15, 0.05])  # outcomes 0..3 under the policy
    human = [0.0, 1.0, 1.0, -0.5]  # H-hat ties outcomes 1 and 2
    g = np.array([2.0, -1.0, 3.0, 7.0])  # any function of the outcome
    for k in (2, 3):
        weighted = unweighted = 0.0
        for candidates in itertools.product(range(4), repeat=k):
            prob = float(np.prod(mu[list(candidates)]))
            values = [human[c] for c in candidates]
            for j, keep in enumerate(keep_probabilities(values, p)):
                rho = k * keep
                weighted += prob * keep * g[candidates[j]] / rho
                unweighted += prob * keep * g[candidates[j]]
        assert weighted == pytest.approx(float(mu @ g), abs=1e-12)
        if p > 0:  # without the weights, the kept outcomes are biased toward H-hat's favourites
            assert abs(unweighted - float(mu @ g)) > 0.05


def test_control_share_draws_match_the_keep_probabilities_and_its_rho():
    rng = np.random.default_rng(0)
    values, p, n = np.array([0.2, 0.7, -0.1, 0.7]), 0.6, 40000
    want = keep_probabilities(list(values), p)
    counts = np.zeros(4)
    for _ in range(n):
        index, by_model, rho = control_share(values, p, rng)
        counts[index] += 1
        assert rho == pytest.approx(4 * want[index])
        assert not by_model or values[index] == values.max()
    se = np.sqrt(np.array(want) * (1 - np.array(want)) / n)
    assert np.all(np.abs(counts / n - want) < 4 * se), (counts / n, want)


def test_control_share_monte_carlo_weighted_mean_is_mu_mean():
    rng = np.random.default_rng(1)
    mu = np.array([0.6, 0.3, 0.1])
    human, g = np.array([-1.0, 0.0, 1.0]), np.array([0.0, 1.0, 10.0])
    kept, weights = [], []
    for _ in range(20000):
        candidates = rng.choice(3, size=4, p=mu)
        index, _, rho = control_share(human[candidates], 0.5, rng)
        kept.append(g[candidates[index]])
        weights.append(1 / rho)
    kept, weights = np.array(kept), np.array(weights)
    target = float(mu @ g)
    weighted = kept * weights
    assert abs(weighted.mean() - target) < 4 * weighted.std() / math.sqrt(len(kept))
    assert kept.mean() - target > 10 * kept.std() / math.sqrt(len(kept))  # the raw kept draws are biased


def test_the_laws_are_the_rules_probabilities_by_hand():
    values = np.array([0.2, 0.7, -0.1, 0.7])
    for p in (0.0, 0.6, 1.0):  # against the slow reference, ties included
        assert control_share_law(values, p) == pytest.approx(keep_probabilities(list(values), p), abs=1e-15)
    # exp(log2 * E * H): 2, 1, 2^-0.5 over their sum
    law = bias_actions_law(np.array([1.0, 0.0, -1.0]), np.array([1.0, 1.0, 0.5]), math.log(2))
    z = 2 + 1 + 2**-0.5
    assert law == pytest.approx([2 / z, 1 / z, 2**-0.5 / z], abs=1e-15)
    with pytest.raises(ValueError, match="p in"):
        control_share_law(values, -0.1)
    with pytest.raises(ValueError, match="as many eligibilities"):
        bias_actions_law(values, np.ones(3), 1.0)


def test_control_share_refuses_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="K >= 2"):
        control_share(np.array([1.0]), 0.5, rng)
    with pytest.raises(ValueError, match="p in"):
        control_share(np.array([1.0, 2.0]), 1.5, rng)


def test_eligibility_by_hand():
    z = np.array([[0.0, 0.0], [3.0, 3.0]])
    anchors = np.array([[1.0, 1.0], [0.0, 2.0]])
    times = np.array([100.0, 40.0])
    got = eligibility(z, anchors, times, now=110.0, width=1.0, half_life_s=10.0)
    # row 0: anchor 0: d2 = 1, age 10 -> exp(-0.5) * 0.5; anchor 1: d2 = 2, age 70 -> exp(-1) * 2^-7
    # row 1: anchor 0: d2 = 4 -> exp(-2) * 0.5; anchor 1: d2 = (9 + 1) / 2 = 5 -> exp(-2.5) * 2^-7
    assert got == pytest.approx([math.exp(-0.5) * 0.5, math.exp(-2) * 0.5])
    assert eligibility(z, np.zeros((0, 2)), np.zeros(0), now=0.0, width=1.0, half_life_s=1.0).tolist() == [0, 0]
    # a label "from the future" (clock skew) counts as just made
    assert eligibility(z[:1], anchors[:1], np.array([200.0]), now=110.0, width=1.0, half_life_s=10.0) == pytest.approx(
        [math.exp(-0.5)]
    )
    with pytest.raises(ValueError):
        eligibility(z, anchors, times, now=0.0, width=0.0, half_life_s=1.0)


def test_beta_decays_per_step():
    assert beta_at(2.0, 0.5, 0) == 2.0
    assert beta_at(2.0, 0.5, 3) == 0.25
    assert beta_at(1.0, 1.0, 1000) == 1.0


def test_head_standardises_and_clips():
    head = HumanHead(
        mean=np.array([1.0, 0.0], np.float32),
        scale=np.array([2.0, 1.0], np.float32),
        weight=np.array([1.0, -0.5], np.float32),
        bias=0.25,
    )
    x = np.array([[3.0, 0.5], [1.0, 4.0], [41.0, 0.0]])
    # z = [[1, .5], [0, 4], [20, 0]] -> w.z + b = [1 - .25 + .25, -2 + .25, 20.25]
    assert head.raw(x) == pytest.approx([1.0, -1.75, 20.25])
    assert head.predict(x) == pytest.approx([1.0, -1.0, 1.0])
    message = HumanModel(
        version=1,
        active=True,
        feature="mean_last_hidden",
        mean=head.mean,
        scale=head.scale,
        weight=head.weight,
        bias=head.bias,
        anchors=np.zeros((0, 2), np.float32),
        anchor_times=np.zeros(0),
        labels=0,
    )
    assert HumanHead.from_message(message).predict(x) == pytest.approx(head.predict(x))


def scored(rollout_id, *, human=None, selection=None, reward=1.0):
    r = Rollout(
        prompt_id="p",
        group_id="g",
        rollout_id=rollout_id,
        generator_id="gen",
        group_size=1,
        prompt_tokens=np.array([1], np.int32),
        completion_tokens=np.array([2], np.int32),
        behaviour_logprobs=np.array([-1.0], np.float32),
        policy_version=0,
        finish_reason=FinishReason.STOP,
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=4),
        selection=selection,
    )
    return ScoredRollout(rollout=r, reward=reward, human=human)


def test_human_terms_by_hand():
    batch = [
        scored("a", human=HumanScore(value=0.5, eligibility=0.5, model_version=2)),
        scored("b", human=HumanScore(value=-1.0, eligibility=1.0, model_version=2, active=False)),  # paused
        scored("c"),  # not scored by H-hat
        scored("d", selection=Selection(candidates=4, probability=0.5, by_model=True, density_ratio=2.5)),
    ]
    terms = human_terms(batch, combination=HumanCombination.REWARD_SHAPING, beta_t=0.8)
    assert terms.shaping.tolist() == pytest.approx([0.8 * 0.5 * 0.5, 0.0, 0.0, 0.0])
    assert terms.weights.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.4])
    assert terms.stats["human/shaped_fraction"] == 0.25
    assert terms.stats["human/selected_fraction"] == 0.25
    assert terms.bonus.tolist() == [0.0] * 4
    # Q-augmentation: the same term, as an advantage bonus instead of a reward
    terms = human_terms(batch, combination=HumanCombination.Q_AUGMENTATION, beta_t=0.8)
    assert terms.bonus.tolist() == pytest.approx([0.8 * 0.5 * 0.5, 0.0, 0.0, 0.0])
    assert terms.shaping.tolist() == [0.0] * 4 and terms.stats["human/shaped_fraction"] == 0.25
    # neither under action biasing, control sharing or none; the weights follow how a rollout was drawn
    for combination in (HumanCombination.NONE, HumanCombination.ACTION_BIASING, HumanCombination.CONTROL_SHARING):
        terms = human_terms(batch, combination=combination, beta_t=0.8)
        assert terms.shaping.tolist() == [0.0] * 4 and terms.bonus.tolist() == [0.0] * 4
        assert terms.weights.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.4])


def test_bias_actions_keeps_a_candidate_with_the_softmax_of_beta_e_h_and_the_weight_undoes_it():
    values, eligibilities = np.array([1.0, 0.0, -1.0]), np.array([1.0, 1.0, 0.5])
    beta_t = math.log(2)  # exp(beta * E * H) = 2, 1, 2^-0.5
    z = 2 + 1 + 2**-0.5
    want = [2 / z, 1 / z, 2**-0.5 / z]
    seen: dict[int, tuple[float, float]] = {}
    counts = np.zeros(3)
    rng = np.random.default_rng(0)
    for _ in range(20000):
        index, probability, rho = bias_actions(values, eligibilities, beta_t, rng)
        seen[index] = (probability, rho)
        counts[index] += 1
    assert sorted(seen) == [0, 1, 2]
    for j in range(3):
        assert seen[j][0] == pytest.approx(want[j]) and seen[j][1] == pytest.approx(3 * want[j])
    # drawn with those probabilities (within 4 standard errors)
    assert np.abs(counts / 20000 - want).max() < 4 * math.sqrt(0.25 / 20000)
    # the learner's weight 1/rho makes the kept candidate an exact draw from mu: for any g,
    # sum_j P(J=j | c) g(c_j) / rho_j = the plain mean of g over the candidates
    g = np.array([3.0, -1.0, 7.0])
    assert sum(seen[j][0] * g[j] / seen[j][1] for j in range(3)) == pytest.approx(g.mean())
    # beta_t = 0: uniform, weight 1
    assert bias_actions(values, eligibilities, 0.0, rng)[1:] == pytest.approx((1 / 3, 1.0))
    with pytest.raises(ValueError, match="K >= 2"):
        bias_actions(values[:1], eligibilities[:1], 1.0, rng)
    with pytest.raises(ValueError, match="beta_t >= 0"):
        bias_actions(values, eligibilities, -1.0, rng)


def test_reference_features_are_the_unpadded_mean_over_completion_positions():
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, seed=0).eval()
    prompts = [np.array([5, 6, 7], np.int32), np.array([8], np.int32), np.array([9, 10, 11, 12, 13], np.int32)]
    completions = [np.array([14, 15], np.int32), np.array([16, 17, 18, 19], np.int32), np.array([20], np.int32)]
    got = reference_features(model, prompts, completions, pad_id=tokenizer.pad_token_id, batch_size=2)
    assert got.shape == (3, model.config.hidden_size) and got.dtype == np.float32
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids = torch.tensor(np.concatenate([p, c]), dtype=torch.long)[None]
            hidden = model.base_model(input_ids=ids).last_hidden_state[0]
            np.testing.assert_allclose(got[i], hidden[len(p) :].mean(0).numpy(), rtol=1e-4, atol=1e-5)
    # truncation keeps the completion's end
    short = reference_features(model, prompts[2:], completions[2:], pad_id=tokenizer.pad_token_id, max_tokens=2)
    with torch.no_grad():
        ids = torch.tensor([[13, 20]])
        np.testing.assert_allclose(
            short[0], model.base_model(input_ids=ids).last_hidden_state[0, 1:].mean(0).numpy(), rtol=1e-4, atol=1e-5
        )
    with pytest.raises(ValueError):
        reference_features(model, prompts, completions[:2], pad_id=0)


def test_a_model_with_another_feature_is_refused_and_counted_not_fatal():
    import zmq

    from streamrl.common.config import load_config
    from streamrl.common.human import HumanModelSubscription
    from streamrl.common.metrics import ServiceMetrics
    from streamrl.common.transport import make_socket, send
    from streamrl.testing import free_port

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = load_config(None, [f'endpoints.human_model="{endpoint}"'])
    ctx = zmq.Context()
    pub = make_socket(ctx, zmq.PUB, bind=endpoint, max_message_bytes=1 << 20, hwm=10)
    metrics = ServiceMetrics("scorer", "scorer-0")
    sub = HumanModelSubscription(ctx, cfg, metrics)
    try:

        def model(version, feature):
            return HumanModel(
                version=version,
                active=True,
                feature=feature,
                mean=np.zeros(2, np.float32),
                scale=np.ones(2, np.float32),
                weight=np.ones(2, np.float32),
                bias=0.0,
                anchors=np.zeros((0, 2), np.float32),
                anchor_times=np.zeros(0),
                labels=1,
            )

        got = None
        for _ in range(100):  # the subscription takes a moment to reach the publisher
            send(pub, model(2, "mean_last_hidden"))
            got = sub.receive() or got
            if got:
                break
            time.sleep(0.05)
        assert got == 2 and sub.view.version == 2
        send(pub, model(5, "something_else"))
        send(pub, model(1, "mean_last_hidden"))  # older: ignored
        for _ in range(50):
            if sub.receive() is None and metrics.rejected.labels(reason="bad_value")._value.get() == 1:
                break
            time.sleep(0.05)
        assert sub.view.version == 2
        assert metrics.rejected.labels(reason="bad_value")._value.get() == 1
    finally:
        sub.close()
        pub.close(0)
        ctx.term()
