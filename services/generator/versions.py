"""The generator's policy-version rules: when to fetch announced weights, when to pause, whether they fit.

Versions are the learner's counter (``services/learner/versions.py``): a
generator loads a newer announced version between batches, and pauses while
the newest announced version is more than ``max_staleness`` (eta) ahead of the
loaded one, because the buffer would drop what it sampled.
"""

from __future__ import annotations

from collections.abc import Collection


def needs_fetch(loaded: int | None, announced: int) -> bool:
    """True when ``announced`` is newer than the ``loaded`` version (None: nothing loaded yet)."""
    return loaded is None or announced > loaded


def too_stale(loaded: int | None, announced: int, max_staleness: int) -> bool:
    """True when sampling with ``loaded`` weights would be wasted: nothing is loaded, or the
    newest ``announced`` version is more than ``max_staleness`` versions ahead."""
    return loaded is None or announced - loaded > max_staleness


def check_fit(missing: Collection[str], unexpected: Collection[str], tied: Collection[str]) -> None:
    """Check the result of ``model.load_state_dict(tensors, strict=False)``.

    Args:
        missing: parameter names the model has and the weights lack.
        unexpected: names in the weights the model does not have.
        tied: names that are aliases of another parameter (tied embeddings), which the learner
            does not send (:func:`streamrl.common.weights.tied_duplicates`).

    Raises:
        RuntimeError: the weights do not fit the model (another model's weights, or a partial state).
    """
    absent = [name for name in missing if name not in tied]
    if unexpected or absent:
        raise RuntimeError(f"weights do not fit the model: missing {absent}, unexpected {list(unexpected)}")
