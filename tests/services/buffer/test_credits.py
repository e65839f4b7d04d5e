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
from streamrl.services.buffer.credits import CreditLedger, awaiting_groups, batch_generators
from streamrl.services.buffer.durable import DurableBuffer, admission_capacity
from streamrl.services.buffer.journal import LOST
from streamrl.services.buffer.store import AddOutcome, BufferEvent, ReplayBuffer
from support import scored_item

G = 2  # rollouts per group


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ask(
    ledger: CreditLedger,
    gid: str,
    *,
    version: int,
    sent: int,
    want: int = 4,
    instance: str | None = None,
    held: int = 0,
):
    req = m.CreditRequest(
        sender=gid, instance=instance or gid.split("#")[0], policy_version=version, groups_sent=sent, want=want
    )
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
    store = ReplayBuffer(
        capacity_groups=10_000,
        overflow=OverflowPolicy.BLOCK,
        max_reuse=1,
        max_staleness=eta,
        group_timeout_s=1e9,
        clock=clock,
    )
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
            grant = ask(
                ledger, g["id"], version=g["w"], sent=g["sent"], want=rng.randint(1, 3), held=held_groups(store)
            )
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
    return (
        store,
        ledger,
        {"served": served, "staleness_max": staleness_max, "generated": generated, "worst": worst, "gens": gens},
    )


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


# ---------------------------------------------------------------------------- a learner that restarts
#
# The buffer service's glue between the batch protocol (DurableBuffer) and the ledger, as in
# services/buffer/loop.py (_take_request, _serve_pending, _grant), driven without sockets.


def learner_request(ledger: CreditLedger, state: DurableBuffer, req: m.BatchRequest) -> m.Batch | None:
    """BufferService._take_request then _serve_pending: the batch sent for ``req``, or None (pending)."""
    again = state.take_request(b"learner", req)
    ledger.learner_asked(req.learner_version)
    if again is not None:
        ledger.served(again.learner_version, batch_generators(again), batch_id=again.msg_id, again=True)
        return again
    served = state.serve_pending("buffer")
    if served is None:
        return None
    batch = served[1]
    ledger.served(batch.learner_version, batch_generators(batch), batch_id=batch.msg_id)
    return batch


def generator_asks(ledger: CreditLedger, state: DurableBuffer, request: m.CreditRequest):
    """BufferService._grant."""
    return ledger.grant(
        request, state.store.complete_groups + state.store.incomplete_groups + awaiting_groups(state.held)
    )


def groups_in(batch: m.Batch) -> int:
    return len({s.rollout.group_id for s in batch.rollouts})


def restart_run(
    *,
    eta: int,
    B: int,
    resume: str,
    seed: int | None,
    crash_at: int = 4,
    checkpoint_every: int = 3,
    steps: int = 16,
    generators: int = 2,
):
    """A pipeline whose learner is killed while training ``crash_at`` and restarts (DurableBuffer protocol).

    ``resume``: "published" (the learner continues at published + 1 so versions never go back,
    services/learner/versions.py continue_at), "checkpoint" (at its newest checkpoint's version: it
    goes back) or "older" (at the checkpoint before that one, the newest being unreadable: it goes back
    past batches the buffer already acknowledged). ``seed`` None: events in a fixed round-robin order.

    Measured independently of the ledger after every event: the groups admitted ahead of the learner =
    granted and not sampled (none: generators sample a grant at once) + in flight + held in the store +
    held batches waiting to be served again + the batch the learner trains now. Returns a dict of
    what was observed; asserts nothing itself except progress.
    """
    rng = random.Random(seed)
    clock = Clock()
    ledger = CreditLedger(B, eta, ttl_s=1e9, clock=clock)
    store = ReplayBuffer(
        capacity_groups=admission_capacity(10_000, B, eta),
        overflow=OverflowPolicy.BLOCK,
        max_reuse=1,
        max_staleness=eta,
        group_timeout_s=1e9,
        clock=clock,
    )
    state = DurableBuffer(store, None)
    dropped: list[str] = []
    store.on_event = lambda event, ids: dropped.extend(ids) if event is BufferEvent.DROPPED_STALE else None
    gens = [{"id": f"gen-{i}#a", "w": 0, "sent": 0} for i in range(generators)]
    channel: deque = deque()  # (gid, group id, version)
    lrn = {"version": 0, "durable": 0, "resumed": 0, "published": 0, "checkpoints": [0], "batch": None}
    restarted = False
    out = {"over": [], "after_restart_credits": 0, "generated_after_restart": set(), "trained": 0}

    def ahead() -> int:
        lost = sum(groups_in(h.batch) for h in state.held if h.owner == LOST)
        current = groups_in(lrn["batch"]) if lrn["batch"] is not None else 0
        return len(channel) + store.complete_groups + store.incomplete_groups + lost + current

    for tick in range(100_000):
        if lrn["version"] >= steps:
            break
        clock.now += 0.01
        event = rng.random() if seed is not None else (tick % 4) / 4
        if event < 0.25:  # a generator asks and samples what it got
            g = gens[rng.randrange(generators)] if seed is not None else gens[(tick // 4) % generators]
            grant = generator_asks(
                ledger,
                state,
                m.CreditRequest(
                    sender=g["id"], instance=g["id"].split("#")[0], policy_version=g["w"], groups_sent=g["sent"], want=B
                ),
            )
            for _ in range(grant.credits):
                group = f"{g['id']}:{g['sent']}"
                channel.append((g["id"], group, g["w"]))
                g["sent"] += 1
                if restarted:
                    out["generated_after_restart"].add(group)
            if grant.credits:
                out["after_restart_credits"] += grant.credits if restarted else 0
                if ahead() > ledger.window:
                    out["over"].append((lrn["version"], ahead()))
        elif event < 0.5:  # everything in flight arrives
            while channel:
                gid, group, version = channel.popleft()
                for k in range(G):
                    ledger.arrived(gid, group)
                    state.add(item(gid, group, k, version), [])
        elif event < 0.75:  # the learner asks, or trains what it was given
            if lrn["batch"] is None:
                lrn["batch"] = learner_request(
                    ledger,
                    state,
                    m.BatchRequest(
                        sender="learner",
                        learner_version=lrn["version"],
                        num_groups=B,
                        durable_version=lrn["durable"],
                        resumed_at=lrn["resumed"],
                    ),
                )
            elif not restarted and lrn["version"] == crash_at:  # killed while training it
                restarted = True
                newest = lrn["checkpoints"][-1]
                if resume == "published":
                    at = lrn["published"] + 1 if lrn["published"] > newest else newest
                elif resume == "checkpoint":
                    at = newest
                else:
                    at = lrn["checkpoints"][-2]
                    lrn["checkpoints"].pop()
                lrn.update(
                    version=at,
                    durable=at if resume != "published" else newest,
                    resumed=at,
                    batch=None,
                    published=max(lrn["published"], at),
                )
            else:
                for s in lrn["batch"].rollouts:
                    assert (
                        lrn["version"] - s.rollout.policy_version <= eta
                        or s.rollout.group_id not in out["generated_after_restart"]
                    ), "a group admitted after the restart was trained too stale"
                out["trained"] += groups_in(lrn["batch"])
                lrn["version"] += 1
                lrn["published"] = max(lrn["published"], lrn["version"])
                lrn["batch"] = None
                if lrn["version"] % checkpoint_every == 0:
                    lrn["durable"] = lrn["version"]
                    lrn["checkpoints"].append(lrn["version"])
        else:  # a generator loads the newest announced weights (never an older number)
            g = gens[rng.randrange(generators)] if seed is not None else gens[(tick // 4) % generators]
            g["w"] = max(g["w"], lrn["version"])
    out["finished"] = lrn["version"] >= steps
    out["restarted"] = restarted
    out["dropped_after_restart"] = sorted({rid.rsplit("-", 1)[0] for rid in dropped} & out["generated_after_restart"])
    return out


@pytest.mark.parametrize("resume", ["published", "checkpoint", "older"])
@pytest.mark.parametrize("eta,B", [(0, 2), (1, 2), (2, 3)])
def test_learner_restart_keeps_the_bound_and_does_not_starve(resume, eta, B):
    out = restart_run(eta=eta, B=B, resume=resume, seed=None)
    assert out["restarted"]
    assert out["finished"], "the pipeline stalled after the learner restarted"
    assert out["over"] == [], f"credits granted past (eta + 1) x B = {(eta + 1) * B} (version, groups ahead)"
    assert out["dropped_after_restart"] == []
    assert out["after_restart_credits"] > 0


@pytest.mark.parametrize("seed", range(6))
def test_learner_restart_random_orders(seed):
    eta, B = [(0, 2), (1, 3), (2, 2)][seed % 3]
    resume = ["published", "checkpoint", "older"][seed // 2]
    out = restart_run(eta=eta, B=B, resume=resume, seed=seed, crash_at=3 + seed % 3, checkpoint_every=2 + seed % 2)
    assert out["restarted"] and out["finished"]
    assert out["over"] == [] and out["dropped_after_restart"] == []


def test_batches_served_again_after_a_learner_restart_count_hand_computed():
    """eta 1, B 2 (window 4): the learner checkpointed version 0, trained 0 and 1, was served 2 and
    died; it restarts at version 3 (published 2 + 1). Its 3 batches are served again as 3, 4, 5."""
    clock = Clock()
    ledger = CreditLedger(2, 1, ttl_s=1e9, clock=clock)
    store = ReplayBuffer(
        capacity_groups=4, overflow=OverflowPolicy.BLOCK, max_reuse=1, max_staleness=1, group_timeout_s=1e9, clock=clock
    )
    state = DurableBuffer(store, None)
    sent = 0

    def generate(version: int, want: int) -> int:
        nonlocal sent
        grant = generator_asks(
            ledger,
            state,
            m.CreditRequest(sender="g#1", instance="g", policy_version=version, groups_sent=sent, want=want),
        )
        for _ in range(grant.credits):
            for k in range(G):
                ledger.arrived("g#1", f"g:{sent}")
                state.add(item("g#1", f"g:{sent}", k, version), [])
            sent += 1
        return grant.credits

    def ask(version: int, resumed: int) -> m.Batch | None:
        return learner_request(
            ledger,
            state,
            m.BatchRequest(
                sender="learner", learner_version=version, num_groups=2, durable_version=0, resumed_at=resumed
            ),
        )

    assert generate(0, 10) == 4
    for v in range(3):
        assert ask(v, 0) is not None
        assert generate(v, 10) == (0 if v == 0 else 2)  # the window less the batch of v (2) and 2 held
    assert ledger.learner_version == 2 and ledger.served_for_version == 2 and store.complete_groups == 2
    trained_before = ledger.generators["g#1"].trained
    # the learner dies training version 2; its new process asks for version 3
    again = ask(3, 3)
    assert again is not None and [s.rollout.group_id for s in again.rollouts][::2] == ["g:0", "g:1"]
    assert ledger.served_for_version == 2 and awaiting_groups(state.held) == 4
    # ahead of the learner: 2 (its batch) + 4 (batches 1 and 2 to serve again) + 2 held = 8 > 4: no credit
    # (before this rule the ledger saw 0 served for 3 and nothing waiting: it granted 2, ahead 10)
    assert generate(3, 10) == 0
    assert ask(3, 3) is again and ledger.served_for_version == 2  # sent again after a lost reply: counted once
    assert ledger.generators["g#1"].trained == trained_before  # served again: not trained twice
    assert ask(4, 3) is not None and generate(4, 10) == 0  # 2 + 2 waiting + 2 held = 6
    assert ask(5, 3) is not None and generate(5, 10) == 0  # 2 + 0 waiting + 2 held = 4: the window
    batch = ask(6, 3)  # the 2 held groups (version 2) are stale at 6 and dropped; the request waits
    assert batch is None and store.dropped_stale_total == 2 * G
    assert generate(6, 10) == 4  # nothing ahead: the whole window again (no deadlock)
    assert ask(6, 3) is not None and ledger.served_for_version == 2


def test_learner_that_goes_back_moves_the_ledger_back():
    ledger = CreditLedger(2, 0, clock=Clock())  # sync mode
    ledger.learner_asked(5)
    ledger.served(5, ["g#1", "g#1"], batch_id="b5")
    assert ask(ledger, "g#1", version=5, sent=0).credits == 0  # the batch of 5 is served
    ledger.learner_asked(4)  # a (new) learner restarted from an older checkpoint asks for version 4
    assert ledger.learner_version == 4 and ledger.served_for_version == 0
    assert ask(ledger, "g#1", version=5, sent=0).credits == 2  # weights newer than the learner's: no lag
    ledger.served(3, ["g#1"], batch_id="old")  # a batch for an older version than asked: not counted for 4
    assert ledger.learner_version == 4 and ledger.served_for_version == 0
