"""``python -m streamrl.common.config [--update docs/config.md]``: print the config reference table, or
rewrite it in place (:func:`streamrl.common.config.reference_doc.replace_reference`)."""

import sys

from streamrl.common.config.reference_doc import _main

raise SystemExit(_main(sys.argv[1:]))
