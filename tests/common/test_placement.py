"""run.cpu_placement (common/placement.py): which cores each service gets, by hand, and a real
process whose threads (one started before the placement) all end up on the chosen cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from streamrl.common.config import load_config
from streamrl.common.placement import placement


@pytest.mark.parametrize(
    "service, cpus, threads, ranks, rank, expected",
    [
        ("learner", [0, 1], 1, 1, 0, [0]),
        ("generator", [0, 1], 1, 1, 0, [1]),
        ("scorer", [0, 1], 1, 1, 0, [1]),
        ("buffer", [0, 1, 2, 3], 1, 1, 0, [1, 2, 3]),
        ("learner", [2, 3, 5, 7, 11], 2, 1, 0, [2, 3]),  # the cores this process may use, not 0..n-1
        ("feedback", [2, 3, 5, 7, 11], 2, 1, 0, [5, 7, 11]),
        ("learner", list(range(8)), 2, 2, 1, [2, 3]),  # rank 1 of 2 data-parallel ranks
        ("generator", list(range(8)), 2, 2, 0, [4, 5, 6, 7]),
        ("learner", list(range(8)), 2, 2, 2, None),  # a rank beyond the reserved ones
        ("learner", [0], 1, 1, 0, None),  # one core: nothing left for the others
        ("generator", [0, 1], 2, 1, 0, None),  # the learner's threads take every core
    ],
)
def test_the_learner_owns_its_cores_and_the_others_share_the_rest(service, cpus, threads, ranks, rank, expected):
    assert placement(service, cpus, learner_threads=threads, learner_ranks=ranks, local_rank=rank) == expected


def test_the_setting_defaults_to_none_and_refuses_other_values():
    from streamrl.common.config import ConfigError

    assert load_config(None, []).run.cpu_placement == "none"
    with pytest.raises(ConfigError, match="run.cpu_placement"):
        load_config(None, ['run.cpu_placement="pin"'])


CHILD = """
import json, os, threading, time
from streamrl.common.placement import place_process
stop = threading.Event()
early = threading.Thread(target=stop.wait, daemon=True)
early.start()  # a thread that exists before the placement (as torch's or a library's)
cores = place_process(os.environ["SERVICE"], "learner_owns_cores", learner_threads=1, learner_ranks=1)
masks = {}
for tid in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{tid}/status") as f:
        masks[tid] = [line.split(":")[1].strip() for line in f if line.startswith("Cpus_allowed_list")][0]
print(json.dumps({"cores": cores, "masks": sorted(set(masks.values())), "threads": len(masks)}))
stop.set()
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
@pytest.mark.parametrize("service", ["learner", "generator"])
def test_every_thread_of_a_real_process_moves_to_its_cores(service):
    cpus = sorted(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        env=dict(os.environ, SERVICE=service),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = cpus[:1] if service == "learner" else cpus[1:]
    assert got["cores"] == want and got["threads"] >= 2
    expected_mask = str(want[0]) if len(want) == 1 else f"{want[0]}-{want[-1]}"
    if want == list(range(want[0], want[-1] + 1)):  # a contiguous set prints as a range
        assert got["masks"] == [expected_mask]
    assert len(got["masks"]) == 1  # all threads alike
