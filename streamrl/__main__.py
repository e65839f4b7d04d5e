"""``python -m streamrl`` is the ``streamrl`` command."""

from streamrl.cli import main

main()
