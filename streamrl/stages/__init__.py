"""The offline RLHF stages, run before (or instead of) streaming PPO: supervised fine-tuning on
demonstrations (:mod:`~streamrl.stages.sft`, ``streamrl sft``) and reward-model training on ranked
responses (:mod:`~streamrl.stages.reward_model`, ``streamrl rm``), with their shared training loop
(:mod:`~streamrl.stages.finetune`), data layouts (:mod:`~streamrl.stages.rlhf_data`) and losses
(:mod:`~streamrl.stages.rlhf_losses`). ``streamrl pipeline`` (:mod:`streamrl.pipeline`) chains them
with PPO and the held-out evaluations."""
