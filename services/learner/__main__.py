"""``python -m services.learner --config FILE [--set key=value ...]``."""

from common.service import start_service
from services.learner.loop import Learner


def main(argv: list[str] | None = None) -> None:
    ctx = start_service("learner", argv)
    try:
        Learner(ctx).run()
    finally:
        ctx.close()


if __name__ == "__main__":
    main()
