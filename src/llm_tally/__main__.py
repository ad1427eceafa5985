"""``python -m llm_tally``: the same as the ``llm-tally`` command."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
