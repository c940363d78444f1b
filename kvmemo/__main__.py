"""``python -m kvmemo``: the same as the ``kvmemo`` console script."""

from .cli import main

raise SystemExit(main())
