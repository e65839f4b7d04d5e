"""TRL side of bench/trl_grpo.py; runs in .venv-trl (TRL is not a streamrl dependency).

Trains with ``trl.GRPOTrainer`` on CPU, offline, until an absolute wall-clock deadline,
then saves the policy as a Hugging Face folder and writes a JSON log of its steps.
The reward is streamrl's own ``streamrl.services.scorer.rewards:vader_sentiment`` (bench/setup_trl.sh
installs streamrl into .venv-trl without dependencies; the reward needs only torch and vaderSentiment).
Hyperparameters come from a JSON file written by bench/trl_grpo.py from streamrl's config.

Usage (bench/trl_grpo.py runs it)::

    HF_HUB_OFFLINE=1 .venv-trl/bin/python bench/trl_worker.py --spec spec.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    """Train until the spec's deadline; write ``<output>/trl_log.json`` and the model folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="JSON written by bench/trl_grpo.py")
    spec = json.loads(Path(parser.parse_args().spec).read_text())

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from streamrl.services.scorer.rewards import vader_sentiment

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    transformers.utils.logging.disable_progress_bar()
    out = Path(spec["output"])
    prompts = [json.loads(line)["prompt"] for line in Path(spec["prompts"]).read_text().splitlines() if line]
    dataset = Dataset.from_list([{"prompt": p} for p in prompts])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)

    def reward(prompts, completions, **kwargs):
        return vader_sentiment(list(prompts), list(completions), [{} for _ in completions])

    steps: list[dict] = []

    class Deadline(TrainerCallback):
        """Stop after the optimizer step during which the deadline passed; record each step."""

        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"step": state.global_step, "time": time.time()})
            if time.time() >= spec["deadline"]:
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and steps:
                steps[-1].update({k: v for k, v in logs.items() if isinstance(v, (int, float))})

    h = spec["hyper"]
    config = trl.GRPOConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=h["minibatch_size"],
        steps_per_generation=h["minibatches"],
        num_generations=h["group_size"],
        num_iterations=h["ppo_epochs"],
        max_completion_length=h["max_new_tokens"],
        temperature=h["temperature"],
        top_p=h["top_p"],
        learning_rate=h["lr"],
        weight_decay=h["weight_decay"],
        max_grad_norm=h["max_grad_norm"],
        beta=h["kl_coef"],
        epsilon=h["clip_eps"],
        lr_scheduler_type="constant",
        max_steps=1_000_000,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=bool(spec.get("bf16", False)),  # CPU autocast through accelerate, like our autocast_bf16
        seed=spec["seed"],
        dataloader_num_workers=0,
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Deadline()],
    )
    started = time.time()
    trainer.train()
    finished = time.time()
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(str(out / "model"))
    log = {
        "started": started,
        "finished": finished,
        "steps": steps,
        "optimizer_steps": trainer.state.global_step,
        "completions_per_step": h["minibatch_size"],
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "config": {
            k: getattr(config, k)
            for k in (
                "per_device_train_batch_size",
                "steps_per_generation",
                "generation_batch_size",
                "num_generations",
                "max_completion_length",
                "learning_rate",
                "beta",
                "epsilon",
                "loss_type",
                "scale_rewards",
                "temperature",
                "top_p",
                "num_iterations",
            )
        },
    }
    (out / "trl_log.json").write_text(json.dumps(log, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
