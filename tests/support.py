"""Test-only helpers: repository paths, ragged masks, garbage padding, scored rollouts, an HTTP reward server.

Helpers that run real services (ports, configs, processes, scrapes) live in
:mod:`streamrl.testing`, which the benchmarks share.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from streamrl.common import messages as m

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def ragged_mask(lengths: list[int], t: int):
    """``[B, t]`` bool mask, row b true on its first ``lengths[b]`` positions (right padding)."""
    import torch

    return torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def fill_garbage(x, mask):
    """Copy of tensor ``x`` whose masked-out positions cycle through NaN, +inf, -inf, 1e30, -1e30."""
    import math

    import torch

    junk = torch.tensor([math.nan, math.inf, -math.inf, 1e30, -1e30], dtype=x.dtype)
    pad = junk[torch.arange(x.numel()) % 5].reshape(x.shape)
    return torch.where(mask, x, pad)


def slow_nucleus(logits, top_p: float):
    """Slow reference for top-p: a bool mask over the last dim keeping the most probable
    tokens, in order, while the mass of the tokens strictly ahead of a token is < top_p
    (so the kept mass reaches top_p); a python loop over positions and tokens."""
    import torch

    keep = torch.zeros(logits.shape, dtype=torch.bool)
    flat, out = logits.reshape(-1, logits.shape[-1]), keep.view(-1, logits.shape[-1])
    for row in range(flat.shape[0]):
        probs = torch.softmax(flat[row].double(), -1)
        mass = 0.0
        for v in torch.argsort(probs, descending=True).tolist():
            if mass >= top_p:
                break
            out[row, v] = True
            mass += float(probs[v])
    return keep


def scored_item(
    group: str, k: int, *, size: int = 2, version: int = 0, prompt: str | None = None, rid: str | None = None
):
    """Member ``k`` of group ``group`` as a ScoredRollout (reward ``k``); rollout id ``{group}-{k}`` unless given."""
    rollout = m.Rollout(
        sender="generator-test",
        prompt_id=prompt if prompt is not None else f"prompt-{group}",
        group_id=group,
        rollout_id=rid if rid is not None else f"{group}-{k}",
        generator_id="generator-test",
        group_size=size,
        prompt_tokens=np.array([5, 6, 7], dtype=np.int32),
        completion_tokens=np.array([8, 9], dtype=np.int32),
        behaviour_logprobs=np.array([-0.5, -1.25], dtype=np.float32),
        policy_version=version,
        finish_reason=m.FinishReason.STOP,
        sampling=m.SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=16),
    )
    return m.ScoredRollout(rollout=rollout, reward=float(k), scorer_id="s0")


PROMPT_COMPLETIONS = [
    ("Hi", "there friend"),
    ("Hi", "yo"),
    ("A much longer prompt here", "ok!"),
    ("A much longer prompt here", "not ok at all"),
    ("Q:", "x"),
    ("Q:", "an answer of some length"),
    ("Tell", "abc"),
    ("Tell", "a b c d e f g"),
]
"""Four groups of two (prompt, completion) texts of unequal lengths, for :func:`text_rollout` (member ``i``
is in group ``i // 2``)."""


def text_rollout(
    tokenizer,
    i: int,
    prompt: str,
    completion: str,
    *,
    reward: float,
    behaviour_logprob: float,
    temperature: float,
    top_p: float = 1.0,
    max_new_tokens: int = 16,
) -> m.ScoredRollout:
    """Rollout ``r{i}`` of group ``g{i // 2}`` (groups of 2, prompt ``p{i // 2}``, policy version 0, cut at
    the length limit): ``prompt`` and ``completion`` as ``tokenizer``'s ids (no special tokens, int32), every
    behaviour log-prob ``behaviour_logprob`` (nats), scored ``reward``."""
    p, c = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in (prompt, completion))
    rollout = m.Rollout(
        prompt_id=f"p{i // 2}",
        group_id=f"g{i // 2}",
        rollout_id=f"r{i}",
        generator_id="g0",
        group_size=2,
        prompt_tokens=np.asarray(p, np.int32),
        completion_tokens=np.asarray(c, np.int32),
        behaviour_logprobs=np.full(len(c), behaviour_logprob, np.float32),
        policy_version=0,
        finish_reason=m.FinishReason.LENGTH,
        sampling=m.SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens),
    )
    return m.ScoredRollout(rollout=rollout, reward=reward)


def metric_names(registry) -> set[str]:
    """Names in a prometheus_client registry as scraped (counters with ``_total``), process collectors left out."""
    return {
        f.name + ("_total" if f.type == "counter" else "") for f in registry.collect() if f.name.startswith("streamrl_")
    }


def declared_metrics(metric_set_class) -> set[str]:
    """The names (without ``streamrl_<service>_``) a service's ``MetricSet`` class adds to a fresh registry."""
    from streamrl.common.metrics import ServiceMetrics

    service = metric_set_class.SERVICE
    bare = metric_names(ServiceMetrics(service, f"{service}-0").registry)
    registry = ServiceMetrics(service, f"{service}-0")
    metric_set_class(registry)
    prefix = f"streamrl_{service}_"
    return {name.removeprefix(prefix) for name in metric_names(registry.registry) - bare}


def documented_metrics(service: str) -> set[str]:
    """The metric names the metrics table of docs/metrics.md lists in the row of ``service``."""
    import re

    table = (REPO / "docs" / "metrics.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(f"| {service} |")]
    assert len(rows) == 1, f"the metrics table of docs/metrics.md has {len(rows)} rows for {service}"
    return set(re.findall(r"`([a-z_]+)(?:\{[a-z_]+\})?`", rows[0]))  # `name` or `name{label}`


def permuted_char_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """The tiny char tokenizer with its printable characters' ids shuffled (same size, same special ids)."""
    import json
    import random

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from streamrl.common.models import build_char_tokenizer

    base = build_char_tokenizer()
    spec = json.loads(base.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    chars = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= 4]
    ids = [vocab[c] for c in chars]
    random.Random(seed).shuffle(ids)
    spec["model"]["vocab"] = {**{t: i for t, i in vocab.items() if i < 4}, **dict(zip(chars, ids))}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def train_tiny_reward_model(
    folder: Path, model_dir: Path, *, preferred: str, pairs: int, eval_rows: int, max_length: int
) -> Path:
    """Train a tiny reward model (``streamrl rm``, top block only) on ``pairs`` synthetic pairs whose
    chosen response is drawn from ``preferred * 3 + "xyz"`` and rejected from ``"bbbxyz"`` (6 characters
    each), under ``folder``; returns the reward-model folder."""
    import json
    import random

    from streamrl.common.config import validate_config
    from streamrl.stages.reward_model import run_rm

    rng = random.Random(0)
    rows = [
        {
            "prompt": f"q{i}:",
            "chosen": " " + "".join(rng.choice(preferred * 3 + "xyz") for _ in range(6)),
            "rejected": " " + "".join(rng.choice("bbbxyz") for _ in range(6)),
        }
        for i in range(pairs)
    ]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = validate_config(
        {
            "run": {"output_dir": str(folder / "run")},
            "rm": {
                "base_model": str(model_dir),
                "data": {"path": str(folder / "pairs.jsonl"), "eval_rows": eval_rows},
                "epochs": 2,
                "lr": 3e-3,
                "threads": 1,
                "trainable_layers": 1,
                "max_length": max_length,
            },
        }
    )
    return Path(run_rm(config, log=lambda line: None)["output_dir"])


def fp32_head_on_bf16_body(model, batch, value_head):
    """By hand: the body under bf16 autocast, then the float32 output projection and value head
    on its hidden states (a Llama body keeps its residual stream in float32), for a learner ``TrainBatch``.
    Returns ``[B, T]`` log-probs, ``[B, T]`` values and the largest log-prob change a bf16 projection of the same hidden
    states makes (the control); at the batch's temperature, untruncated."""
    import torch

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    hidden = hidden.gather(1, batch.positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    weight = model.get_output_embeddings().weight.detach()
    temperature = batch.sampling.temperature
    logits = hidden.float() @ weight.float().T / temperature
    in_bf16 = (hidden.to(torch.bfloat16) @ weight.to(torch.bfloat16).T).float() / temperature
    pick = batch.tokens.unsqueeze(-1)
    logprobs = torch.log_softmax(logits, -1).gather(-1, pick).squeeze(-1)
    control = torch.log_softmax(in_bf16, -1).gather(-1, pick).squeeze(-1)
    values = (hidden.float() @ value_head.weight.detach().T + value_head.bias.detach()).squeeze(-1)
    return logprobs, values, float((control - logprobs)[batch.mask > 0].abs().max())


class RewardServer:
    """A real HTTP reward server: reward = number of 'a' in the completion (+ metadata bonus).

    ``script`` lists how to answer the next requests (``"ok"``, an HTTP status, ``"sleep"``,
    ``"short"``: one reward too few, ``"nan"``); afterwards every request is answered ``ok``.
    """

    def __init__(self, script=(), sleep_s: float = 0.0):
        self.script = list(script)
        self.sleep_s = sleep_s
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.times: list[float] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                server.times.append(time.monotonic())
                action = server.script.pop(0) if server.script else "ok"
                if action == "sleep":
                    time.sleep(server.sleep_s)
                if isinstance(action, int):
                    self._send(action, {"detail": "scripted failure"})
                    return
                rewards = [c.count("a") + m.get("bonus", 0) for c, m in zip(body["completions"], body["metadata"])]
                if action == "short":
                    rewards = rewards[:-1]
                if action == "nan":
                    self._send(200, {"rewards": ["NaN"] * len(rewards)})
                    return
                self._send(200, {"rewards": rewards})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def tiny_eval_config(model_dir):
    """A validated config for held-out evaluations of the tiny model in ``model_dir``: the review openings
    (10% held out), 10 new tokens, the count-"e" reward, the learner on the CPU."""
    from streamrl.common.config import validate_config

    return validate_config(
        {
            "model": {"path": str(model_dir)},
            "generator": {
                "max_new_tokens": 10,
                "prompts": {"path": str(REPO / "deploy/prompts/review_openings.jsonl"), "eval_fraction": 0.1},
            },
            "scorer": {
                "rewards": [{"function": "streamrl.services.scorer.rewards:count_char", "kwargs": {"char": "e"}}]
            },
            "learner": {"device": "cpu"},
        }
    )
