"""``python -m services.scorer --config FILE [--set key=value ...] [--index N]``."""

from common.service import run_service
from services.scorer.loop import Scorer

if __name__ == "__main__":
    run_service("scorer", Scorer)
