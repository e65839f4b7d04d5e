"""``python -m streamrl.services.learner --config FILE [--set key=value ...] [--index N]``."""

from streamrl.common.service import run_service
from streamrl.services.learner.loop import LearnerService

if __name__ == "__main__":
    run_service("learner", LearnerService)
