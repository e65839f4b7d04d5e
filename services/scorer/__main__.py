"""``python -m streamrl.services.scorer --config FILE [--set key=value ...] [--index N]``."""

from streamrl.common.service import run_service
from streamrl.services.scorer.loop import ScorerService

if __name__ == "__main__":
    run_service("scorer", ScorerService, exit_process=True)
