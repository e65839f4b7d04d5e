"""``python -m services.generator --config FILE [--set key=value ...] [--index N]``."""

from common.service import run_service
from services.generator.loop import Generator

if __name__ == "__main__":
    run_service("generator", Generator)
