"""``python -m services.buffer --config FILE [--set key=value ...]``."""

from common.service import start_service
from services.buffer.loop import BufferService


def main(argv: list[str] | None = None) -> None:
    ctx = start_service("buffer", argv)
    try:
        BufferService(ctx).run()
    finally:
        ctx.close()


if __name__ == "__main__":
    main()
