"""``python -m services.scorer --config FILE [--set key=value ...] [--index N]``."""

from common.service import start_service
from services.scorer.loop import Scorer


def main(argv: list[str] | None = None) -> None:
    ctx = start_service("scorer", argv)
    try:
        Scorer(ctx).run()
    finally:
        ctx.close()


if __name__ == "__main__":
    main()
