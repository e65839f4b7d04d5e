"""``python -m services.buffer --config FILE [--set key=value ...] [--index N]``."""

from common.service import run_service
from services.buffer.loop import BufferService

if __name__ == "__main__":
    run_service("buffer", BufferService)
