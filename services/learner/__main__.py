"""``python -m streamrl.services.learner --config FILE [--set key=value ...] [--index N]``.

Under ``torchrun`` (``learner.world_size > 1``) rank 0 is the learner service and the other
ranks train beside it (``streamrl.services.learner.distributed``)."""

import os

from streamrl.common.service import run_service

if __name__ == "__main__":
    if int(os.environ.get("RANK", "0")) > 0:
        from streamrl.services.learner.distributed import run_worker
        run_worker()
    else:
        from streamrl.services.learner.loop import LearnerService
        run_service("learner", LearnerService)
