"""Generation credits (services/buffer/credits.py): the bound, sync mode, fairness, restarts, expiry.

The simulations drive the real ReplayBuffer with the real ledger: generators ask for
credits, sample exactly what they were granted (with their possibly lagging weights),
the groups reach the store in the order they were sent, the learner takes B groups per
version; after every event the ledger's bound must hold, and at the end nothing was
dropped as stale.
"""

from __future__ import annotations

import random
from collections import deque

import pytest

from streamrl.common import messages as m
from streamrl.common.modes import OverflowPolicy
from streamrl.services.buffer.credits import CreditLedger
from streamrl.services.buffer.store import AddOutcome, ReplayBuffer
from support import scored_item

G = 2  # rollouts per group


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ask(ledger: CreditLedger, gid: str, *, version: int, sent: int, want: int = 4, instance: str | None = None,
        held: int = 0):
    req = m.CreditRequest(sender=gid, instance=instance or gid.split("#")[0], policy_version=version,
                          groups_sent=sent, want=want)
    return ledger.grant(req, held)


def held_groups(store: ReplayBuffer) -> int:
    return store.complete_groups + store.incomplete_groups


def item(gid: str, group: str, k: int, version: int) -> m.ScoredRollout:
    s = scored_item(group, k, size=G, version=version)
    s.rollout.generator_id = gid
    return s


def simulate(*, eta: int, B: int, generators: int, steps: int, seed: int, lag_p: float = 0.3):
    """Run the pipeline until the learner trained ``steps`` versions; returns (store, ledger, stats)."""
    rng = random.Random(seed)
    clock = Clock()
    ledger = CreditLedger(B, eta, ttl_s=1e9, clock=clock)
    store = ReplayBuffer(capacity_groups=10_000, overflow=OverflowPolicy.BLOCK, max_reuse=1, max_staleness=eta,
                         group_timeout_s=1e9, clock=clock)
    gens = [{"id": f"gen-{i}#a", "w": 0, "sent": 0} for i in range(generators)]
    channel: deque = deque()  # (gid, group id, version), in send order
    learner = 0
    ledger.learner_asked(0)
    served = staleness_max = generated = 0
    worst = 0
    for _ in range(200_000):
        if learner >= steps:
            break
        clock.now += 0.01
        event = rng.random()
        if event < 0.35:  # a generator asks and samples what it got, with the weights it has
            g = rng.choice(gens)
            grant = ask(ledger, g["id"], version=g["w"], sent=g["sent"], want=rng.randint(1, 3),
                        held=held_groups(store))
            for _ in range(grant.credits):
                channel.append((g["id"], f"{g['id']}:{g['sent']}", g["w"]))
                g["sent"] += 1
                generated += 1
        elif event < 0.7 and channel:  # the oldest group in flight arrives
            gid, group, version = channel.popleft()
            for k in range(G):
                ledger.arrived(gid, group)
                assert store.add(item(gid, group, k, version)) is AddOutcome.ACCEPTED
        elif event < 0.85:  # the learner trains when it can
            sample = store.sample(B, learner)
            if sample is not None:
                owners = {r.rollout.group_id: r.rollout.generator_id for r in sample.rollouts}
                ledger.served(learner, list(owners.values()))
                served += len(owners)
                staleness_max = max(staleness_max, *sample.staleness)
                learner += 1
                ledger.learner_asked(learner)
        elif rng.random() > lag_p:  # a generator loads the newest weights (others lag)
            rng.choice(gens)["w"] = learner
        in_flight = len(channel)
        # the bound: everything admitted ahead of the learner fits in (eta + 1) batches
        assert held_groups(store) + in_flight + ledger.served_for_version <= (eta + 1) * B
        assert ledger.outstanding() >= in_flight
        worst = max(worst, held_groups(store) + in_flight + ledger.served_for_version)
    assert learner >= steps, "the pipeline stalled"
    return store, ledger, {"served": served, "staleness_max": staleness_max, "generated": generated,
                           "worst": worst, "gens": gens}


@pytest.mark.parametrize("eta,B,generators,seed", [(2, 4, 1, 0), (1, 3, 3, 1), (3, 2, 4, 2), (2, 8, 2, 3)])
def test_nothing_generated_beyond_the_bound_and_nothing_dropped(eta, B, generators, seed):
    store, ledger, stats = simulate(eta=eta, B=B, generators=generators, steps=60, seed=seed)
    assert store.dropped_stale_total == 0
    assert stats["staleness_max"] <= eta
    assert stats["worst"] == (eta + 1) * B  # the bound is reached (credits are not needlessly scarce)
    # every group a generator sampled was granted: credits never exceeded
    assert stats["generated"] <= ledger.granted_total
    assert stats["generated"] - stats["served"] <= (eta + 1) * B


def test_sync_mode_generates_nothing_that_is_dropped():
    store, ledger, stats = simulate(eta=0, B=3, generators=2, steps=80, seed=5)
    assert store.dropped_stale_total == 0 and stats["staleness_max"] == 0
    assert stats["generated"] - stats["served"] <= 3  # at most the batch being filled


def test_sync_mode_waits_for_the_new_version():
    ledger = CreditLedger(2, 0, clock=Clock())
    ledger.learner_asked(0)
    assert ask(ledger, "g#1", version=0, sent=0, want=5).credits == 2  # one batch, no more
    assert ask(ledger, "g#1", version=0, sent=2, want=5, held=0).credits == 0  # both in flight
    for n in range(2):
        ledger.arrived("g#1", f"g#1:{n}")
    assert ask(ledger, "g#1", version=0, sent=2, held=2).credits == 0  # held, not yet served
    ledger.served(0, ["g#1", "g#1"])
    grant = ask(ledger, "g#1", version=0, sent=2, held=0)
    assert grant.credits == 0 and "served" in grant.reason and grant.trained_groups == 2
    ledger.learner_asked(1)  # the learner trains version 1 now; the generator still has version 0
    grant = ask(ledger, "g#1", version=0, sent=2, held=0)
    assert grant.credits == 0 and "behind" in grant.reason
    assert ask(ledger, "g#1", version=1, sent=2, held=0).credits == 2


def test_lagging_weights_get_fewer_credits():
    ledger = CreditLedger(4, 2, clock=Clock())
    ledger.learner_asked(5)
    assert ask(ledger, "a#1", version=5, sent=0, want=100).credits == 12  # (2 + 1) x 4
    ledger2 = CreditLedger(4, 2, clock=Clock())
    ledger2.learner_asked(5)
    assert ask(ledger2, "a#1", version=4, sent=0, want=100).credits == 8  # one version behind: one batch less
    ledger2.served(5, ["x"] * 4)
    assert ask(ledger2, "b#1", version=4, sent=0, want=100).credits == 0  # 8 outstanding fill (3 - 1) x 4 - 4


def test_held_and_in_flight_count_and_a_new_grant_replaces_the_old():
    ledger = CreditLedger(4, 1, clock=Clock())  # window 8
    ledger.learner_asked(0)
    assert ask(ledger, "a#1", version=0, sent=0, want=3, held=2).credits == 3
    assert ledger.outstanding() == 3
    # the generator sampled only 1 of its 3 and asks again: the 2 unspent are replaced, not added
    assert ask(ledger, "a#1", version=0, sent=1, want=3, held=2).credits == 3
    assert ledger.outstanding() == 4  # 1 in flight + 3 granted
    ledger.arrived("a#1", "a#1:0")
    ledger.arrived("a#1", "a#1:0")  # a second member of the same group: counted once
    assert ledger.outstanding() == 3
    # 4 sent, 1 arrived (and held with 2 others): 8 - 3 held - 3 in flight
    assert ask(ledger, "a#1", version=0, sent=4, want=8, held=3).credits == 2


def test_fair_share_among_generators():
    ledger = CreditLedger(4, 1, clock=Clock())  # window 8
    ledger.learner_asked(0)
    ask(ledger, "a#1", version=0, sent=0, want=1)
    ask(ledger, "b#1", version=0, sent=0, want=1)
    # a greedy generator cannot take more than half while b is active
    assert ask(ledger, "a#1", version=0, sent=1, want=8).credits == 3  # 4 - its 1 in flight
    assert ask(ledger, "b#1", version=0, sent=1, want=8).credits == 3
    assert ask(ledger, "a#1", version=0, sent=4, want=8).credits == 0


def test_restarted_generator_loses_its_unspent_credits():
    ledger = CreditLedger(4, 1, clock=Clock())
    ledger.learner_asked(0)
    assert ask(ledger, "gen-0#old", instance="gen-0", version=0, sent=0, want=8).credits == 8
    # it crashed before sampling; its new process asks with a new id
    grant = ask(ledger, "gen-0#new", instance="gen-0", version=0, sent=0, want=8)
    # the old process's 8 unspent are gone (it reported 0 sent); only the new grant counts
    assert grant.credits == 8 and ledger.outstanding() == 8
    assert ledger.expired_total == 8


def test_silent_generator_and_lost_groups_expire():
    clock = Clock()
    ledger = CreditLedger(4, 1, ttl_s=10, clock=clock)
    ledger.learner_asked(0)
    assert ask(ledger, "a#1", version=0, sent=0, want=8).credits == 8
    assert ask(ledger, "b#1", version=0, sent=0, want=8).credits == 0  # a holds the window
    clock.now = 5
    assert ask(ledger, "a#1", version=0, sent=8, want=1).credits == 0  # 8 in flight
    clock.now = 16  # a's 8 reported at t=5 never arrived within ttl; a is silent since 5
    assert ask(ledger, "b#1", version=0, sent=0, want=8).credits == 8
    assert ledger.expired_total == 8


def test_restarted_buffer_regrants_from_what_it_holds():
    ledger = CreditLedger(4, 1, clock=Clock())  # a fresh ledger: the buffer restarted, its journal kept 5 groups
    ledger.learner_asked(3)
    grant = ask(ledger, "a#1", version=3, sent=40, want=8, held=5)
    assert grant.credits == 3  # 8 - 5 held; the generator's earlier 40 groups are not in flight here
    # one sampled under the old buffer's credits arrives late: it is held from now on and takes the place of
    # one of the 3 credits in the ledger (the one overshoot a buffer restart allows, module docstring)
    ledger.arrived("a#1", "a#1:39")
    assert ledger.outstanding() == 2


def test_bad_arguments_and_backwards_counts():
    with pytest.raises(ValueError):
        CreditLedger(0, 1)
    ledger = CreditLedger(2, 1, clock=Clock())
    ask(ledger, "a#1", version=0, sent=5)
    grant = ask(ledger, "a#1", version=0, sent=3)
    assert grant.credits == 0 and "backwards" in grant.reason
