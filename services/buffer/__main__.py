"""``python -m streamrl.services.buffer --config FILE [--set key=value ...] [--index N]``."""

from streamrl.common.service import run_service
from streamrl.services.buffer.loop import BufferService

if __name__ == "__main__":
    run_service("buffer", BufferService, exit_process=True)
