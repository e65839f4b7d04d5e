"""``python -m streamrl.services.learner --config FILE [--set key=value ...] [--index N]``.

With ``learner.world_size = N > 1`` the process replaces itself with ``torchrun --standalone
--nproc-per-node N`` (same arguments); under torchrun rank 0 is the learner service and the
other ranks train beside it (``streamrl.services.learner.launch``)."""

import os
import sys

from streamrl.common.service import run_service

if __name__ == "__main__":
    from streamrl.services.learner.launch import relaunch_under_torchrun, run_worker

    relaunch_under_torchrun(sys.argv[1:])
    if int(os.environ.get("RANK", "0")) > 0:
        run_worker()
    else:
        from streamrl.services.learner.loop import LearnerService

        run_service("learner", LearnerService, exit_process=True)
