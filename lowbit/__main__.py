"""``python -m lowbit ...`` runs the ``lowbit`` command line (see lowbit/cli.py)."""

from lowbit.cli import main

raise SystemExit(main())
