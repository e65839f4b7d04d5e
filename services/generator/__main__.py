"""``python -m streamrl.services.generator --config FILE [--set key=value ...] [--index N]``."""

from streamrl.common.service import run_service
from streamrl.services.generator.loop import GeneratorService

if __name__ == "__main__":
    run_service("generator", GeneratorService, exit_process=True)
