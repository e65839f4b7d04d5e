"""``streamrl rm``: reward-model training, the second stage of the RLHF pipeline
(Ouyang et al. 2022, "InstructGPT", sec. 3.5 "Reward modeling").

The reward model is ``AutoModelForSequenceClassification`` with one label on the base
model (a linear ``score`` head, read at the last non-padding token: see
:mod:`streamrl.common.reward_model`), so its folder loads anywhere transformers does.
Each training row is one prompt with K >= 2 responses ranked best first (a preference
pair is K = 2); one batch element holds all C(K, 2) comparisons of its prompt and the
loss is InstructGPT's eq. 1 (:func:`streamrl.stages.rlhf_losses.kwise_ranking_loss`, equal to
the pairwise Bradley-Terry loss for K = 2). Texts are ``rendered prompt + response``
truncated on the left, exactly as the scorer will score them.

CPU budget: ``[rm] trainable_layers = N`` freezes the embeddings and all but the top N
blocks, and ``cache_frozen`` computes the frozen part once per text, so an epoch costs
about N / (number of blocks) of a full pass.

After training, the reward is normalised: the bias ``-mean raw score of the
demonstrations`` (the best response of every training row: for hh-rlhf the chosen
responses, i.e. the SFT demonstrations; with ``rm.gold`` the rows of both halves, so the
proxy and the gold model score the same texts 0 on average) is stored in the folder's ``config.json``
(``streamrl_reward.bias``) and added by every scorer, so the demonstrations score 0 on
average. Reported: held-out accuracy (comparisons ranked right) with its standard error,
the mean margin, and the same on the training rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from streamrl.common.config import Config
from streamrl.common.reward_model import REWARD_INFO_KEY, RewardModelInfo, encode_texts, pool_last, score_head
from streamrl.stages.finetune import Stage, StageError, Trunk, optimise
from streamrl.stages.rlhf_data import Example, render_prompt, response_text
from streamrl.stages.rlhf_losses import RankingAccuracy, kwise_ranking_loss, ranking_accuracy

__all__ = ["comparisons", "encode_responses", "run_rm", "score_sequences"]


def encode_responses(
    example: Example, tokenizer, *, chat_template: bool, system_prompt: str | None, max_length: int
) -> list[list[int]]:
    """Token ids of ``rendered prompt + response`` for each response (best first), left-truncated
    as the scorer truncates (:func:`streamrl.common.reward_model.encode_texts`)."""
    prompt = render_prompt(example, tokenizer, chat_template=chat_template, system_prompt=system_prompt)
    texts = [prompt + response_text(r, chat_template=chat_template) for r in example.responses]
    return encode_texts(tokenizer, texts, max_length=max_length)


def _raw_scores(trunk: Trunk, sequences: Sequence[Sequence[int]], *, pad_id: int) -> Tensor:
    hidden, attention = trunk.hidden(sequences, pad_id=pad_id)
    return score_head(trunk.model)(pool_last(hidden, attention)).squeeze(-1).float()


@torch.no_grad()
def score_sequences(trunk: Trunk, sequences: Sequence[Sequence[int]], *, pad_id: int, batch_size: int) -> list[float]:
    """Raw scores (no bias) of token sequences, in input order (length-sorted batches)."""
    trunk.model.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        for i, value in zip(rows, _raw_scores(trunk, [sequences[i] for i in rows], pad_id=pad_id).tolist()):
            scores[i] = value
    return scores


def comparisons(groups: Sequence[Sequence[float]]) -> tuple[Tensor, Tensor]:
    """Every ranked comparison of scored groups: ``(better [n], worse [n])``, response i
    better than j for all i < j of each group (groups are ranked best first)."""
    better, worse = [], []
    for scores in groups:
        for i in range(len(scores)):
            for j in range(i + 1, len(scores)):
                better.append(scores[i])
                worse.append(scores[j])
    return torch.tensor(better, dtype=torch.float64), torch.tensor(worse, dtype=torch.float64)


def _group(flat: Sequence[float], encoded: Sequence[Sequence]) -> list[list[float]]:
    groups, start = [], 0
    for responses in encoded:
        groups.append(list(flat[start : start + len(responses)]))
        start += len(responses)
    return groups


def _evaluate(
    trunk: Trunk, encoded: Sequence[Sequence[list[int]]], *, pad_id: int, batch_size: int
) -> tuple[RankingAccuracy, list[list[float]]]:
    flat = score_sequences(trunk, [s for responses in encoded for s in responses], pad_id=pad_id, batch_size=batch_size)
    groups = _group(flat, encoded)
    return ranking_accuracy(*comparisons(groups)), groups


def _load_classifier(path: str, pad_id: int, device: torch.device):
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch.float32, output_loading_info=True
    )
    fresh = any(key.startswith("score.") for key in info["missing_keys"])
    if fresh:  # a new head scores every text 0: the first comparisons are exact ties
        torch.nn.init.zeros_(score_head(model).weight)
    model.config.pad_token_id = pad_id
    return model.to(device), fresh


def run_rm(config: Config, *, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run the reward-model stage of ``config`` (section ``[rm]``) and return its summary.

    A completed output folder is kept and its summary returned unless ``force``. With
    ``rm.gold = true`` two reward models are trained from the same base on disjoint halves
    of the training rows (:func:`streamrl.stages.rlhf_data.split_proxy_gold`): ``<output>/proxy``
    (for PPO to optimise) and ``<output>/gold`` (for evaluation only), both measured on the
    same held-out rows; the frozen part's output is computed once and shared by both
    (:meth:`streamrl.stages.finetune.Trunk.share_features`). The top-level ``summary.json`` then
    holds both summaries under ``models`` (``proxy``, ``gold``) and the proxy's figures at
    the top level.

    Raises:
        StageError: missing or malformed data, rows with a single response, too few prompts
            to split, or a setting the model cannot take.
    """
    from streamrl.stages.rlhf_data import split_proxy_gold

    cfg = config.rm
    stage = Stage.open(config, "rm", force=force, log=log)
    if isinstance(stage, dict):
        return stage
    train, held, tokenizer = stage.train, stage.held, stage.tokenizer
    single = next((e for e in train + held if len(e.responses) < 2), None)
    if single is not None:
        raise StageError(
            f"rm.data: row {single.row} of {cfg.data.path} has one response; a reward model learns "
            "from ranked responses; fix: use prompt+chosen+rejected, hh-rlhf chosen+rejected or "
            "prompt+responses rows"
        )
    if not held:
        raise StageError(
            "rm.data.eval_rows: 0 held-out rows leave nothing to measure accuracy on; fix: set rm.data.eval_rows >= 1"
        )
    if cfg.gold:
        try:
            halves = dict(zip(("proxy", "gold"), split_proxy_gold(train, seed=cfg.data.split_seed)))
        except ValueError as exc:
            raise StageError(f"rm.gold: {exc}") from None
    else:
        halves = {"": train}
    options = dict(
        chat_template=config.model.chat_template, system_prompt=config.model.system_prompt, max_length=cfg.max_length
    )
    encoded = {name: [encode_responses(e, tokenizer, **options) for e in rows] for name, rows in halves.items()}
    encoded_held = [encode_responses(e, tokenizer, **options) for e in held]
    # the demonstrations: the best response of every training row, both halves with rm.gold
    demonstrations = [responses[0] for rows in encoded.values() for responses in rows]
    trained: dict[str, tuple[torch.nn.Module, dict]] = {}
    first: Trunk | None = None
    for name, rows in encoded.items():
        model, fresh = _load_classifier(stage.base, tokenizer.pad_token_id, stage.device)
        trunk = Trunk(
            model, trainable_layers=cfg.trainable_layers, cache=cfg.cache_frozen, lora=cfg.lora, heads=("score",)
        )
        label = f"rm {name}" if name else "rm"
        log(
            f"{label}: {len(rows)} training rows, {len(encoded_held)} held-out rows, {stage.base} "
            f"({trunk.frozen} of {model.config.num_hidden_layers} blocks frozen, "
            f"{'new' if fresh else 'loaded'} score head), {stage.device}"
        )
        if first is None:  # every text of every model: the frozen part's output is computed once
            trunk.precompute(
                [s for group in [g for e in encoded.values() for g in e] + encoded_held for s in group],
                pad_id=tokenizer.pad_token_id,
                batch_size=cfg.batch_size,
                log=log,
            )
            first = trunk
        elif trunk.caching:
            trunk.share_features(first)
        summary, info = _train_head(config, trunk, fresh, rows, encoded_held, demonstrations, label=label, log=log)
        summary.update(
            stage="rm",
            base_model=cfg.base_model,
            data=cfg.data.path,
            output_dir=str(stage.output / name) if name else str(stage.output),
            config=cfg.model_dump(mode="json"),
            **({"role": name} if name else {}),
        )
        model = trunk.merge()  # LoRA: adapters folded in, a plain sequence classifier
        setattr(model.config, REWARD_INFO_KEY, info.to_dict())
        trained[name] = (model, summary)
    if not cfg.gold:
        model, summary = trained[""]
        return stage.save(model, summary, log)
    proxy, gold = trained["proxy"][1], trained["gold"][1]
    summary = {
        **{k: v for k, v in proxy.items() if k not in ("role", "output_dir")},
        "output_dir": str(stage.output),
        "gold": True,
        "proxy_dir": proxy["output_dir"],
        "gold_dir": gold["output_dir"],
        "models": {"proxy": proxy, "gold": gold},
        "train_rows": proxy["train_rows"] + gold["train_rows"],
    }
    log(
        f"rm: proxy held-out accuracy {proxy['heldout_accuracy']:.3f} +- {proxy['heldout_accuracy_stderr']:.3f}, "
        f"gold {gold['heldout_accuracy']:.3f} +- {gold['heldout_accuracy_stderr']:.3f} on the same "
        f"{len(encoded_held)} held-out rows"
    )
    return stage.save(None, summary, log, parts={name: trained[name] for name in ("proxy", "gold")})


def _train_head(
    config: Config,
    trunk: Trunk,
    fresh: bool,
    encoded: list[list[list[int]]],
    encoded_held: list[list[list[int]]],
    demonstrations: list[list[int]],
    *,
    label: str,
    log: Callable[[str], None],
) -> tuple[dict, RewardModelInfo]:
    """Train one reward model on ``encoded`` rows (token ids per response, best first), measure it
    on ``encoded_held`` and compute its normalisation bias on ``demonstrations`` (token ids of the
    best response of every training row: with ``rm.gold`` both halves', so the proxy and the gold
    model are normalised on the same texts); returns its summary and stored info."""
    cfg = config.rm
    pad = trunk.model.config.pad_token_id
    before = None
    if not fresh:
        before, _ = _evaluate(trunk, encoded_held, pad_id=pad, batch_size=2 * cfg.batch_size)
        log(f"{label}: held-out before: {before.line()}")

    def batch_loss(rows: list[int]) -> Tensor:
        groups = [encoded[i] for i in rows]
        flat = _raw_scores(trunk, [s for g in groups for s in g], pad_id=pad)
        width = max(len(g) for g in groups)
        rewards = torch.zeros(len(groups), width, dtype=flat.dtype, device=flat.device)
        valid = torch.zeros(len(groups), width, dtype=torch.bool, device=flat.device)
        start = 0
        for row, g in enumerate(groups):
            rewards[row, : len(g)] = flat[start : start + len(g)]
            valid[row, : len(g)] = True
            start += len(g)
        return kwise_ranking_loss(rewards, valid)

    stats = optimise(
        trunk,
        cfg,
        lengths=[max(len(s) for s in g) for g in encoded],
        batch_loss=batch_loss,
        seed=config.run.seed,
        log=log,
        label="rm",
    )
    after, held_groups = _evaluate(trunk, encoded_held, pad_id=pad, batch_size=2 * cfg.batch_size)
    train_accuracy, _ = _evaluate(trunk, encoded, pad_id=pad, batch_size=2 * cfg.batch_size)
    demonstrations_mean = float(
        np.mean(score_sequences(trunk, demonstrations, pad_id=pad, batch_size=2 * cfg.batch_size))
    )
    bias = -demonstrations_mean if cfg.normalize else 0.0
    log(f"{label}: held-out {after.line()}; training rows {train_accuracy.line()}")
    log(
        f"{label}: mean raw score of the {len(demonstrations)} demonstrations {demonstrations_mean:+.4f}; "
        f"stored bias {bias:+.4f}"
    )
    summary = {
        "train_rows": len(encoded),
        "heldout_rows": len(encoded_held),
        "heldout_accuracy": after.accuracy,
        "heldout_accuracy_stderr": after.stderr,
        "heldout_margin": after.margin,
        "heldout_margin_stderr": after.margin_stderr,
        "heldout_comparisons": after.n,
        "heldout_accuracy_before": before.accuracy if before is not None else 0.5,
        "heldout_mean_best": float(np.mean([g[0] for g in held_groups])) + bias,
        "heldout_mean_others": float(np.mean([s for g in held_groups for s in g[1:]])) + bias,
        "train_accuracy": train_accuracy.accuracy,
        "train_accuracy_stderr": train_accuracy.stderr,
        "demonstrations_mean_raw": demonstrations_mean,
        "bias": bias,
        "frozen_blocks": trunk.frozen,
        "trainable_parameters": sum(p.numel() for p in trunk.trainable_parameters),
        "chat_template": config.model.chat_template,
        **stats,
    }
    info = RewardModelInfo(
        bias=bias,
        max_length=cfg.max_length,
        chat_template=config.model.chat_template,
        system_prompt=config.model.system_prompt,
        extra={
            "base_model": cfg.base_model,
            "data": cfg.data.path,
            "heldout_accuracy": after.accuracy,
            "heldout_accuracy_stderr": after.stderr,
            **({"role": label.split()[-1]} if " " in label else {}),
        },
    )
    return summary, info
