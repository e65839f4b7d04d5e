"""Test-only helpers: repository paths, ragged masks, garbage padding, scored rollouts.

Helpers that run real services (ports, configs, processes, scrapes) live in
:mod:`streamrl.testing`, which the benchmarks share.
"""

from __future__ import annotations

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


def scored_item(group: str, k: int, *, size: int = 2, version: int = 0, prompt: str | None = None,
                rid: str | None = None):
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


def metric_names(registry) -> set[str]:
    """Names in a prometheus_client registry as scraped (counters with ``_total``), process collectors left out."""
    return {f.name + ("_total" if f.type == "counter" else "") for f in registry.collect()
            if f.name.startswith("streamrl_")}


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
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="<pad>",
                                   eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def train_tiny_reward_model(folder: Path, model_dir: Path, *, preferred: str, pairs: int, eval_rows: int,
                            max_length: int) -> Path:
    """Train a tiny reward model (``streamrl rm``, top block only) on ``pairs`` synthetic pairs whose
    chosen response is drawn from ``preferred * 3 + "xyz"`` and rejected from ``"bbbxyz"`` (6 characters
    each), under ``folder``; returns the reward-model folder."""
    import json
    import random

    from streamrl.common.config import validate_config
    from streamrl.reward_model import run_rm

    rng = random.Random(0)
    rows = [{"prompt": f"q{i}:", "chosen": " " + "".join(rng.choice(preferred * 3 + "xyz") for _ in range(6)),
             "rejected": " " + "".join(rng.choice("bbbxyz") for _ in range(6))} for i in range(pairs)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = validate_config({"run": {"output_dir": str(folder / "run")}, "rm": {
        "base_model": str(model_dir), "data": {"path": str(folder / "pairs.jsonl"), "eval_rows": eval_rows},
        "epochs": 2, "lr": 3e-3, "threads": 1, "trainable_layers": 1, "max_length": max_length}})
    return Path(run_rm(config, log=lambda line: None)["output_dir"])
