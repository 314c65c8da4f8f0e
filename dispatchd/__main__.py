"""``python -m dispatchd`` is the same as the ``dispatchd`` console script."""

from dispatchd.cli import main

raise SystemExit(main())
