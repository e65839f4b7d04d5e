"""``python -m streamrl.services.feedback --config FILE [--set key=value ...]``."""

from streamrl.common.service import run_service
from streamrl.services.feedback.loop import FeedbackService

if __name__ == "__main__":
    run_service("feedback", FeedbackService, exit_process=True)
