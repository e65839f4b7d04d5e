"""Helpers of the feedback tests (tests/services/feedback, tests/e2e/test_feedback*.py)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import requests
import uvicorn

from streamrl.common.messages import FinishReason, Rollout, SamplingParams, ScoredRollout


def scored(rollout_id, *, group="g1", prompt="The film was", completion="good", version=3, reward=0.5):
    """A scored rollout with fixed tokens and the given ids, texts, policy version and reward."""
    r = Rollout(
        prompt_id="p",
        group_id=group,
        rollout_id=rollout_id,
        generator_id="gen-0",
        group_size=2,
        prompt_tokens=np.array([1, 2, 3], np.int32),
        completion_tokens=np.array([4, 5], np.int32),
        behaviour_logprobs=np.array([-1.0, -0.5], np.float32),
        policy_version=version,
        finish_reason=FinishReason.STOP,
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=4),
        prompt_text=prompt,
        completion_text=completion,
    )
    return ScoredRollout(rollout=r, reward=reward, reward_parts={"vader": reward})


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn on a free loopback port until the block ends; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            requests.get(url + "/healthz", timeout=5)
            break
        except requests.RequestException:  # not listening yet, or slow on a loaded machine
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()
