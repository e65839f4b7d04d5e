"""``python -m services.generator --config FILE [--set key=value ...] [--index N]``."""

from common.service import start_service
from services.generator.loop import Generator


def main(argv: list[str] | None = None) -> None:
    ctx = start_service("generator", argv)
    try:
        Generator(ctx).run()
    finally:
        ctx.close()


if __name__ == "__main__":
    main()
