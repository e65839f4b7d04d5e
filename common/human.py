"""People in the loop: H-hat (the learned model of human reinforcement) and the TAMER+RL
combination rules, shared by the scorer (reward shaping), the generator (control sharing),
the learner (how both reach the loss) and the feedback service (which trains H-hat).

Sources: Knox & Stone 2009 "Interactively shaping agents via human reinforcement: the TAMER
framework" (H-hat regressed online from a person's reinforcement); Knox & Stone 2010
"Combining manual feedback with subsequent MDP reward signals for reinforcement learning"
(TAMER+RL: reward shaping R' = R + beta * H-hat, Q-augmentation Q' = Q + beta * H-hat,
action biasing argmax_a [Q(s, a) + beta * H-hat(s, a)] at action selection only, control sharing
with P(a = argmax_a H-hat(s, a)) = min(beta, 1), beta decayed by a constant factor); Knox & Stone
2012 "Reinforcement learning from simultaneous human and MDP reward" (the eligibility
module: H-hat's influence raised only near recently labelled state-actions).

Mapping to language models: a state-action is a (prompt, completion) pair; phi is the frozen
reference model's last hidden state averaged over the completion tokens
(:func:`reference_features`); H-hat is a linear head on standardised phi; "time" for the
beta schedule is the policy version (= learner step).

Notation for shapes: N rollouts, D feature size, M eligibility anchors, K candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from streamrl.common.messages import HumanModel, ScoredRollout
from streamrl.common.modes import HumanCombination
from streamrl.common.tensors import pad_right

if TYPE_CHECKING:  # transformers is imported only where a model is built
    from transformers import PreTrainedModel

FEATURE = "mean_last_hidden"
"""Name of phi: the reference model's last-layer hidden state, averaged over the completion
tokens of ``prompt + completion`` (the prompt conditions it, only completion positions count)."""


@torch.inference_mode()
def reference_features(
    model: PreTrainedModel,
    prompts: Sequence[np.ndarray],
    completions: Sequence[np.ndarray],
    *,
    pad_id: int,
    batch_size: int = 16,
    max_tokens: int = 1024,
) -> np.ndarray:
    """phi(x) for each rollout x: the mean of the frozen model's last hidden state over completion positions.

    Args:
        model: a causal LM (``transformers``; ``model.base_model`` returns ``last_hidden_state``) in eval mode.
        prompts: N ``[P_i]`` int token arrays.
        completions: N ``[T_i]`` int token arrays (T_i >= 1).
        pad_id: padding token id (padded positions are masked out of attention and of the mean).
        batch_size: rows per forward pass.
        max_tokens: rows longer than this keep their last ``max_tokens`` tokens (the prompt is cut first).

    Returns:
        ``[N, D]`` float32 features (D = hidden size); ``[0, D]`` is not produced: N must be >= 1.

    Raises:
        ValueError: the lists differ in length, are empty, or a completion is empty.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(
            f"reference_features: {len(prompts)} prompts and {len(completions)} completions "
            "(need equal, non-zero counts)"
        )
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        rows, spans = [], []
        for p, c in zip(prompts[start : start + batch_size], completions[start : start + batch_size]):
            if len(c) == 0:
                raise ValueError("reference_features: an empty completion has no features")
            ids = np.concatenate([np.asarray(p, dtype=np.int64), np.asarray(c, dtype=np.int64)])[-max_tokens:]
            completion_len = min(len(c), len(ids))
            rows.append(ids)
            spans.append((len(ids) - completion_len, len(ids)))
        input_ids, attention = pad_right(rows, value=pad_id)
        hidden = model.base_model(
            input_ids=input_ids.to(device), attention_mask=attention.long().to(device)
        ).last_hidden_state.float()  # [B, L, D]
        positions = torch.arange(hidden.shape[1], device=device)
        lo = torch.tensor([s for s, _ in spans], device=device).unsqueeze(1)
        hi = torch.tensor([e for _, e in spans], device=device).unsqueeze(1)
        weights = ((positions >= lo) & (positions < hi)).float()  # [B, L] completion positions
        pooled = (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)
        out.append(pooled.cpu().numpy().astype(np.float32))
    return np.concatenate(out)


@dataclass
class HumanHead:
    """H-hat(x) = clip(w . ((phi(x) - mean) / scale) + b, -1, 1).

    Attributes:
        mean: ``[D]`` float32 feature mean.
        scale: ``[D]`` float32 feature scale (> 0).
        weight: ``[D]`` float32.
        bias: float.
    """

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float

    @classmethod
    def from_message(cls, message: HumanModel) -> HumanHead:
        """The head carried by a :class:`~streamrl.common.messages.HumanModel`."""
        return cls(
            mean=np.asarray(message.mean, np.float32),
            scale=np.asarray(message.scale, np.float32),
            weight=np.asarray(message.weight, np.float32),
            bias=float(message.bias),
        )

    @property
    def dim(self) -> int:
        """D, the feature size."""
        return int(self.weight.shape[0])

    def standardize(self, features: np.ndarray) -> np.ndarray:
        """``[N, D]`` -> ``[N, D]`` float32 standardised features z = (phi - mean) / scale."""
        return ((np.asarray(features, np.float32) - self.mean) / self.scale).astype(np.float32)

    def raw(self, features: np.ndarray) -> np.ndarray:
        """``[N, D]`` -> ``[N]`` float64 unclipped w . z + b."""
        return self.standardize(features).astype(np.float64) @ self.weight.astype(np.float64) + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        """``[N, D]`` -> ``[N]`` float64 H-hat in [-1, 1] (the scale of a +1 / -1 rating)."""
        return np.clip(self.raw(features), -1.0, 1.0)


def eligibility(
    z: np.ndarray, anchors: np.ndarray, anchor_times: np.ndarray, now: float, *, width: float, half_life_s: float
) -> np.ndarray:
    """The eligibility module: how much H-hat may act on each rollout, in [0, 1].

    E(x, t) = max_j exp(-d_j(x)^2 / (2 width^2)) * 2^(-(t - t_j) / half_life),
    d_j(x)^2 = (1/D) * sum_k (z_k(x) - a_jk)^2,

    with z the standardised features of x, a_j those of the j-th recently labelled rollout and
    t_j the time of its label. A rollout near a recent label gets E close to 1; far from every
    label, or once the labels are old, E goes to 0 (Knox & Stone 2012: H-hat's influence is
    raised where the trainer recently gave feedback, and not elsewhere). Labels from the
    future (clock skew) count as just made.

    Args:
        z: ``[N, D]`` standardised features.
        anchors: ``[M, D]`` standardised features of recently labelled rollouts (M may be 0).
        anchor_times: ``[M]`` Unix times (s) of those labels.
        now: Unix time (s) of the rollout.
        width: kernel width in standardised units (> 0).
        half_life_s: seconds after which a label's influence halves (> 0).

    Returns:
        ``[N]`` float64 in [0, 1]; all zeros when M = 0.

    Raises:
        ValueError: ``width`` or ``half_life_s`` not > 0, or mismatched dimensions.
    """
    if width <= 0 or half_life_s <= 0:
        raise ValueError(f"eligibility: width ({width}) and half_life_s ({half_life_s}) must be > 0")
    z = np.asarray(z, np.float64)
    anchors = np.asarray(anchors, np.float64)
    if len(anchors) == 0:
        return np.zeros(len(z))
    if anchors.shape[1] != z.shape[1] or len(anchor_times) != len(anchors):
        raise ValueError(f"eligibility: z is {z.shape}, anchors {anchors.shape}, anchor_times {len(anchor_times)}")
    d2 = ((z[:, None, :] - anchors[None, :, :]) ** 2).mean(-1)  # [N, M]
    age = np.maximum(now - np.asarray(anchor_times, np.float64), 0.0)  # [M]
    value = np.exp(-d2 / (2 * width**2)) * np.exp2(-age / half_life_s)[None, :]
    return np.clip(value.max(1), 0.0, 1.0)


def beta_at(beta: float, decay: float, t: int) -> float:
    """beta_t = beta * decay^t: the TAMER+RL combination weight after ``t`` learner steps."""
    return float(beta * decay ** max(t, 0))


def control_share(values: np.ndarray, probability: float, rng: np.random.Generator) -> tuple[int, bool, float]:
    """Choose one of K candidates drawn i.i.d. from mu: TAMER+RL control sharing.

    With probability p the candidate H-hat rates highest (ties: uniformly among them), else a
    uniformly drawn candidate (itself a draw from mu). The kept completion y was drawn from
    q, not mu. Rule for the learner: weight the rollout by

        1 / rho,  rho = K * P(J = j | c_1..c_K) = (1 - p) + p * K * [j in argmax] / |argmax|

    (J the kept index). For any g, E[g(c_J) / rho] = E[sum_j P(J=j|c) g(c_j) / (K P(J=j|c))]
    = E[(1/K) sum_j g(c_j)] = E_mu[g]: the weighted policy gradient is exactly the one of
    rollouts drawn from mu, whatever H-hat says (unbiased whenever p < 1, since every
    candidate then has P(J = j | c) >= (1 - p)/K > 0; at p = 1 the non-argmax candidates
    are never kept and no weight can undo that: the learner then trains toward H-hat's
    choices, as TAMER+RL's agent simply obeys H-hat at beta >= 1).

    Args:
        values: ``[K]`` H-hat of the candidates (K >= 2).
        probability: p in [0, 1].
        rng: the generator's random stream.

    Returns:
        ``(index, by_model, rho)``: the kept candidate, whether the coin chose H-hat's pick,
        and rho as above.

    Raises:
        ValueError: K < 2 or p outside [0, 1].
    """
    law = control_share_law(values, probability)
    best = np.flatnonzero(np.asarray(values) == np.max(values))
    by_model = bool(rng.random() < probability)
    index = int(rng.choice(best)) if by_model else int(rng.integers(len(law)))
    return index, by_model, float(len(law) * law[index])


def control_share_law(values: np.ndarray, probability: float) -> np.ndarray:
    """The law of :func:`control_share`'s choice: ``[K]`` float64 P(J = j | c_1..c_K) =
    (1 - p) / K + p * [j in argmax] / |argmax| (sums to 1).

    Args:
        values: ``[K]`` H-hat of the candidates (K >= 2).
        probability: p in [0, 1].

    Raises:
        ValueError: K < 2 or p outside [0, 1].
    """
    values = np.asarray(values, np.float64)
    k = len(values)
    if k < 2 or not 0 <= probability <= 1:
        raise ValueError(f"control_share: need K >= 2 candidates and p in [0, 1] (got K={k}, p={probability})")
    best = values == values.max()
    return (1 - probability) / k + probability * best / best.sum()


def bias_actions(
    values: np.ndarray, eligibilities: np.ndarray, beta_t: float, rng: np.random.Generator
) -> tuple[int, float, float]:
    """Choose one of K candidates drawn i.i.d. from mu: TAMER+RL action biasing.

    Knox & Stone (2010) bias action *selection* by H-hat, a = argmax_a [Q(s, a) + beta *
    H-hat(s, a)], and leave learning alone. A language policy's own preference among its
    samples is its softmax, so the biased choice is the Boltzmann one: candidate j is kept
    with probability

        P(J = j | c_1..c_K) = exp(beta_t * E_j * H_j) / sum_k exp(beta_t * E_k * H_k)

    (as K grows the kept completion's law tends to mu(y) * exp(beta_t * E * H-hat(y)) / Z: the
    behaviour policy tilted by H-hat). The learner weights the rollout by 1 / rho with
    rho = K * P(J = j | c), and E[g(c_J) / rho] = E_mu[g] exactly as for :func:`control_share`;
    every P(J = j | c) >= exp(-2 beta_t) / K > 0 since H-hat is in [-1, 1] and E in [0, 1],
    so the weight is bounded by exp(2 beta_t) and the correction is exact at any beta_t.

    Args:
        values: ``[K]`` H-hat of the candidates in [-1, 1] (K >= 2).
        eligibilities: ``[K]`` eligibility of the candidates in [0, 1] (ones without the module).
        beta_t: the decayed combination weight (>= 0).
        rng: the generator's random stream.

    Returns:
        ``(index, probability, rho)``: the kept candidate, P(J = index | c) and rho = K * that.

    Raises:
        ValueError: K < 2, mismatched sizes, or beta_t < 0.
    """
    probabilities = bias_actions_law(values, eligibilities, beta_t)
    k = len(probabilities)
    index = int(rng.choice(k, p=probabilities))
    return index, float(probabilities[index]), float(k * probabilities[index])


def bias_actions_law(values: np.ndarray, eligibilities: np.ndarray, beta_t: float) -> np.ndarray:
    """The law of :func:`bias_actions`' choice: ``[K]`` float64 softmax_j(beta_t * E_j * H_j).

    Args:
        values: ``[K]`` H-hat of the candidates in [-1, 1] (K >= 2).
        eligibilities: ``[K]`` eligibility of the candidates in [0, 1].
        beta_t: the decayed combination weight (>= 0).

    Raises:
        ValueError: K < 2, mismatched sizes, or beta_t < 0.
    """
    values = np.asarray(values, np.float64)
    eligibilities = np.asarray(eligibilities, np.float64)
    k = len(values)
    if k < 2 or eligibilities.shape != values.shape or beta_t < 0:
        raise ValueError(
            f"bias_actions: need K >= 2 values, as many eligibilities and beta_t >= 0 (got K={k}, "
            f"{eligibilities.shape[0] if eligibilities.ndim else 0} eligibilities, beta_t={beta_t})"
        )
    logits = beta_t * eligibilities * values
    probabilities = np.exp(logits - logits.max())
    return probabilities / probabilities.sum()


@dataclass
class HumanTerms:
    """What H-hat adds to one learner batch.

    Attributes:
        shaping: ``[B]`` float32 beta_t * E * H-hat added to each reward under reward shaping
            (0 otherwise, paused, or unscored by H-hat).
        bonus: ``[B]`` float32 beta_t * E * H-hat added to each rollout's advantage under
            Q-augmentation (0 otherwise, paused, or unscored by H-hat).
        weights: ``[B]`` float32 1 / rho of rollouts a generator selected among K candidates
            (action biasing, control sharing), 1 for the others.
        stats: per-batch diagnostics (``human/*``) for the learner's log.
    """

    shaping: np.ndarray
    bonus: np.ndarray
    weights: np.ndarray
    stats: dict[str, float]


def human_terms(rollouts: Sequence[ScoredRollout], *, combination: HumanCombination, beta_t: float) -> HumanTerms:
    """The reward shaping, Q-augmentation and selection weights of a batch (see the module docstring).

    Reward shaping (Knox & Stone 2010, R' = R + beta * H-hat, with the 2012 eligibility module):
    ``shaping_b = beta_t * E_b * H-hat_b`` for rollouts the scorer rated with an active H-hat.
    Q-augmentation (Knox & Stone 2010, Q' = Q + beta * H-hat): the same term as ``bonus_b``,
    which the trainer adds to row b's advantage A = Q - V after the baseline and normalisation,
    so A' = Q' - V; the reward, its running statistics, the group baselines and the critic's
    targets are R's alone. Action biasing and control sharing: ``weights_b = 1 / rho_b``
    (:func:`bias_actions`, :func:`control_share`) for rollouts carrying a
    :class:`~streamrl.common.messages.Selection`, whatever the current combination (the rule
    follows how the rollout was drawn, not today's config).

    Args:
        rollouts: the batch (B scored rollouts).
        combination: the configured :class:`~streamrl.common.modes.HumanCombination`.
        beta_t: the decayed combination weight for this step (:func:`beta_at`).
    """
    n = len(rollouts)
    shaping = np.zeros(n, np.float32)
    bonus = np.zeros(n, np.float32)
    weights = np.ones(n, np.float32)
    scored = selected = by_model = 0
    values = []
    term = {HumanCombination.REWARD_SHAPING: shaping, HumanCombination.Q_AUGMENTATION: bonus}.get(combination)
    for i, s in enumerate(rollouts):
        h = s.human
        if h is not None:
            values.append(h.value)
            if term is not None and h.active:
                term[i] = beta_t * h.eligibility * h.value
                scored += 1
        sel = s.rollout.selection
        if sel is not None:
            weights[i] = 1.0 / sel.density_ratio
            selected += 1
            by_model += int(sel.by_model)
    stats = {
        "human/beta": float(beta_t),
        "human/shaped_fraction": scored / max(n, 1),
        "human/shaping_mean": float(shaping.mean()) if n else 0.0,
        "human/advantage_bonus_mean": float(bonus.mean()) if n else 0.0,
        "human/value_mean": float(np.mean(values)) if values else 0.0,
        "human/scored_fraction": len(values) / max(n, 1),
        "human/selected_fraction": selected / max(n, 1),
        "human/by_model_fraction": by_model / max(n, 1),
        "human/weight_max": float(weights.max()) if n else 1.0,
        "human/weight_mean": float(weights.mean()) if n else 1.0,
    }
    return HumanTerms(shaping=shaping, bonus=bonus, weights=weights, stats=stats)


class HumanModelView:
    """The newest H-hat a scorer or generator received, and the frozen reference model that computes
    its features (loaded on first use: a process that never receives a model never loads it).

    Args:
        model_path: ``model.path`` of the run (resolved with :func:`streamrl.common.models.resolve_model_path`).
        cache_dir: ``model.cache_dir``.
        use_eligibility: apply the eligibility module (``feedback.eligibility``); else E = 1.
        width: ``feedback.eligibility_width``.
        half_life_s: ``feedback.eligibility_half_life_s``.
    """

    def __init__(self, model_path: str, cache_dir=None, *, use_eligibility: bool, width: float, half_life_s: float):
        self.model_path, self.cache_dir = model_path, cache_dir
        self.use_eligibility, self.width, self.half_life_s = use_eligibility, width, half_life_s
        self.message: HumanModel | None = None
        self.head: HumanHead | None = None
        self._model = None
        self._pad_id = 0

    @property
    def version(self) -> int:
        """Version of the model in use (0 before the first)."""
        return self.message.version if self.message is not None else 0

    @property
    def active(self) -> bool:
        """True when a model is in use and the labellers have not paused the human influence."""
        return self.message is not None and self.message.active

    def update(self, message: HumanModel) -> bool:
        """Use ``message`` when it is at least as new as the current one (a same-version message
        carries a start / pause of the influence). Returns True when taken.

        Raises:
            ValueError: the model uses another feature than :data:`FEATURE`.
        """
        if message.feature != FEATURE:
            raise ValueError(
                f"H-hat version {message.version} uses feature {message.feature!r}; this process computes {FEATURE!r}"
            )
        if self.message is not None and message.version < self.message.version:
            return False
        self.message, self.head = message, HumanHead.from_message(message)
        return True

    def _reference(self):
        if self._model is None:
            from streamrl.common.models import load_causal_lm, load_tokenizer, resolve_model_path

            path = resolve_model_path(self.model_path, self.cache_dir)
            self._pad_id = load_tokenizer(path).pad_token_id
            self._model = load_causal_lm(path, device=torch.device("cpu")).eval()
        return self._model

    def score(
        self, prompts: Sequence[np.ndarray], completions: Sequence[np.ndarray], now: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """H-hat and the eligibility of N rollouts (token arrays).

        Returns:
            ``(values, eligibilities)``, each ``[N]`` float64 (values in [-1, 1], eligibilities in [0, 1];
            all ones when the eligibility module is off).

        Raises:
            RuntimeError: no model received yet.
            ValueError: the reference model's hidden size differs from the model's feature size.
        """
        if self.head is None or self.message is None:
            raise RuntimeError("no H-hat version received yet")
        features = reference_features(self._reference(), prompts, completions, pad_id=self._pad_id)
        if features.shape[1] != self.head.dim:
            raise ValueError(
                f"H-hat version {self.version} has {self.head.dim} features; the reference model "
                f"{self.model_path} gives {features.shape[1]} (another model.path?)"
            )
        values = self.head.predict(features)
        if not self.use_eligibility:
            return values, np.ones(len(values))
        z = self.head.standardize(features)
        return values, eligibility(
            z, self.message.anchors, self.message.anchor_times, now, width=self.width, half_life_s=self.half_life_s
        )


class HumanModelSubscription:
    """A scorer's or generator's subscription to the feedback service's H-hat versions
    (``endpoints.human_model``, SUB) and the :class:`HumanModelView` it keeps up to date.

    Args:
        zmq_context: the process's ZeroMQ context.
        config: the run config (``feedback``, ``model``, ``endpoints``, ``transport``).
        metrics: the process's :class:`~streamrl.common.metrics.ServiceMetrics` (rejections are counted there).
        security: the process's CURVE keys, or None.
    """

    def __init__(self, zmq_context, config, metrics, security=None):
        import zmq

        from streamrl.common.transport import Inbox, make_socket

        fb, t = config.feedback, config.transport
        self.view = HumanModelView(
            config.model.path,
            config.model.cache_path,
            use_eligibility=fb.eligibility,
            width=fb.eligibility_width,
            half_life_s=fb.eligibility_half_life_s,
        )
        self.socket = make_socket(
            zmq_context,
            zmq.SUB,
            connect=[config.endpoints.human_model],
            subscribe=b"",
            max_message_bytes=t.max_message_bytes,
            hwm=t.hwm,
            security=security,
        )
        self.inbox = Inbox(metrics, [HumanModel], max_bytes=t.max_message_bytes, socket_name="human_model")

    def receive(self) -> int | None:
        """Take every H-hat message waiting (never blocks); the new version when one was taken, else None."""
        taken = None
        while self.socket.poll(0):
            msg = self.inbox.decode(self.socket.recv_multipart(copy=False))
            if msg is None:
                continue
            try:
                if self.view.update(msg):
                    taken = msg.version
            except ValueError as err:  # another feature: counted and logged like any refused message
                self.inbox.reject("bad_value", str(err))
        return taken

    def close(self) -> None:
        """Close the socket."""
        self.socket.close(0)
