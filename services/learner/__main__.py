"""``python -m services.learner --config FILE [--set key=value ...] [--index N]``."""

from common.service import run_service
from services.learner.loop import Learner

if __name__ == "__main__":
    run_service("learner", Learner)
