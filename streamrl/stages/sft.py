"""``streamrl sft``: supervised fine-tuning on demonstrations, the first stage of the RLHF
pipeline (Ouyang et al. 2022, "InstructGPT", sec. 3.5 "Supervised fine-tuning").

Each training row is a prompt and its demonstration (the chosen response of a preference
pair: for hh-rlhf the demonstrations are the chosen responses of the training split). A
row is tokenized the way the generators see it: the rendered prompt
(:func:`streamrl.stages.rlhf_data.render_prompt`, chat template when ``model.chat_template``),
then the response followed by the EOS token, and the causal-LM loss counts the response
tokens only (:func:`streamrl.stages.rlhf_losses.response_nll`). Batches are length-bucketed;
the learning rate warms up linearly then decays (``[sft] schedule``). The response loss
on held-out rows (never trained on) is measured before and after. The output folder is a
Hugging Face causal LM with its tokenizer (chat template kept): set it as ``model.path``
of a PPO run and it is both the initial policy and the frozen reference. Beside it:
``summary.json``, ``prompts.jsonl`` / ``heldout_prompts.jsonl`` (the prompts of each split,
``{"id", "text", "messages"}``: a prompt source for the generators) and
``demonstrations.jsonl`` (``{"id", "text"}``, the training demonstrations as whole texts:
``learner.ptx_data`` for PPO-ptx).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from streamrl.common.config import Config
from streamrl.common.models import load_causal_lm
from streamrl.stages.finetune import Stage, Trunk, optimise
from streamrl.stages.rlhf_data import Example, render_prompt, response_text

__all__ = ["demonstration_text", "encode_demonstration", "heldout_loss", "prompt_rows", "response_loss", "run_sft"]


def encode_demonstration(
    example: Example, tokenizer, *, chat_template: bool, system_prompt: str | None, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids of prompt + demonstration + EOS, and the mask of the tokens the loss counts.

    The prompt is encoded as the generators encode it (special tokens added only without a
    chat template), the response without special tokens, then EOS (so the model learns to
    stop). Too long: the prompt loses its start (at least one prompt token stays); a
    response longer than ``max_length - 1`` tokens is cut at its end (no EOS then).

    Returns:
        ``(ids, target_mask)``: equal-length lists; ``target_mask`` is 1 on response tokens.
    """
    prompt = render_prompt(example, tokenizer, chat_template=chat_template, system_prompt=system_prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=not chat_template)["input_ids"]
    response = tokenizer(response_text(example.demonstration, chat_template=chat_template), add_special_tokens=False)[
        "input_ids"
    ]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    response = response[: max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(response)) :]
    return prompt_ids + response, [0] * len(prompt_ids) + [1] * len(response)


def response_loss(
    trunk: Trunk, sequences: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], *, pad_id: int
) -> tuple[Tensor, Tensor]:
    """Summed NLL of the response tokens of a batch and their count (see ``response_nll``).

    Same value as :func:`streamrl.stages.rlhf_losses.response_nll` on the full logits, but the
    vocabulary projection runs only at the positions that predict a response token.

    Returns:
        ``(total, count)``: 0-d float32 (nats) and 0-d float32.
    """
    hidden, attention = trunk.hidden(sequences, pad_id=pad_id)
    width = attention.shape[1]
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    targets = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (seq, mask) in enumerate(zip(sequences, masks)):
        ids[row, : len(seq)] = torch.tensor(seq)
        targets[row, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    ids, targets = ids.to(hidden.device), targets.to(hidden.device)
    predicts = targets[:, 1:]  # position t predicts token t + 1
    logits = trunk.model.get_output_embeddings()(hidden[:, :-1][predicts]).float()  # [N, V]
    total = F.cross_entropy(logits, ids[:, 1:][predicts], reduction="sum")
    return total, predicts.sum().to(torch.float32)


@torch.no_grad()
def heldout_loss(
    trunk: Trunk, encoded: Sequence[tuple[list[int], list[int]]], *, pad_id: int, batch_size: int
) -> tuple[float, int]:
    """Mean response NLL per token over ``encoded`` rows (nats/token) and the token count."""
    trunk.model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    total, count = 0.0, 0.0
    for start in range(0, len(order), batch_size):
        rows = [encoded[i] for i in order[start : start + batch_size]]
        t, c = response_loss(trunk, [r[0] for r in rows], [r[1] for r in rows], pad_id=pad_id)
        total, count = total + float(t), count + float(c)
    return total / max(count, 1.0), int(count)


def run_sft(config: Config, *, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run the SFT stage of ``config`` (section ``[sft]``) and return its summary.

    A completed output folder is kept and its summary returned unless ``force``.

    Raises:
        StageError: missing or malformed data, or a setting the model cannot take.
    """
    cfg = config.sft
    stage = Stage.open(config, "sft", force=force, log=log)
    if isinstance(stage, dict):
        return stage
    tokenizer = stage.tokenizer
    model = load_causal_lm(stage.base, device=stage.device)
    trunk = Trunk(model, trainable_layers=cfg.trainable_layers, cache=cfg.cache_frozen, lora=cfg.lora)
    options = dict(
        chat_template=config.model.chat_template, system_prompt=config.model.system_prompt, max_length=cfg.max_length
    )
    encoded = [encode_demonstration(e, tokenizer, **options) for e in stage.train]
    held = stage.held[: cfg.eval_limit] if cfg.eval_limit is not None else stage.held
    encoded_held = [encode_demonstration(e, tokenizer, **options) for e in held]
    pad = tokenizer.pad_token_id
    log(
        f"sft: {len(encoded)} training rows, {len(encoded_held)} held-out rows, {stage.base} "
        f"({trunk.frozen} of {model.config.num_hidden_layers} blocks frozen{', LoRA' if cfg.lora else ''}), "
        f"{stage.device}"
    )
    trunk.precompute([e[0] for e in encoded + encoded_held], pad_id=pad, batch_size=cfg.batch_size, log=log)
    before, tokens = heldout_loss(trunk, encoded_held, pad_id=pad, batch_size=cfg.batch_size)
    log(f"sft: held-out response loss before {before:.4f} nats/token ({tokens} tokens)")

    def batch_loss(rows: list[int]) -> Tensor:
        total, count = response_loss(trunk, [encoded[i][0] for i in rows], [encoded[i][1] for i in rows], pad_id=pad)
        return total / count.clamp(min=1.0)

    stats = optimise(
        trunk,
        cfg,
        lengths=[len(e[0]) for e in encoded],
        batch_loss=batch_loss,
        seed=config.run.seed,
        log=log,
        label="sft",
    )
    after, _ = heldout_loss(trunk, encoded_held, pad_id=pad, batch_size=cfg.batch_size)
    log(f"sft: held-out response loss after {after:.4f} nats/token ({after - before:+.4f})")
    summary = {
        "stage": "sft",
        "base_model": cfg.base_model,
        "data": cfg.data.path,
        "output_dir": str(stage.output),
        "train_rows": len(encoded),
        "heldout_rows": len(encoded_held),
        "heldout_tokens": tokens,
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "frozen_blocks": trunk.frozen,
        "trainable_parameters": sum(p.numel() for p in trunk.trainable_parameters),
        "chat_template": config.model.chat_template,
        **stats,
        "config": cfg.model_dump(mode="json"),
    }
    files = {
        "prompts.jsonl": prompt_rows(stage.train),
        "heldout_prompts.jsonl": prompt_rows(stage.held),
        "demonstrations.jsonl": [
            {
                "id": f"row-{e.row}",
                "text": demonstration_text(
                    e, tokenizer, chat_template=config.model.chat_template, system_prompt=config.model.system_prompt
                ),
            }
            for e in stage.train
        ],
    }
    return stage.save(trunk.merge(), summary, log, files=files)


def demonstration_text(example: Example, tokenizer, *, chat_template: bool, system_prompt: str | None) -> str:
    """The whole demonstration as one text (rendered prompt + response + EOS token): a line of
    ``demonstrations.jsonl``, the SFT data set for PPO-ptx (``learner.ptx_data``)."""
    prompt = render_prompt(example, tokenizer, chat_template=chat_template, system_prompt=system_prompt)
    return prompt + response_text(example.demonstration, chat_template=chat_template) + (tokenizer.eos_token or "")


def prompt_rows(examples: Sequence[Example]) -> list[dict]:
    """``{"id", "text", "messages"}`` per example: a prompt file for the generators
    (``generator.prompts``, kind ``jsonl``) with the prompts of a split."""
    return [{"id": f"row-{e.row}", "text": e.text, "messages": list(e.messages)} for e in examples]
