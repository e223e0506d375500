"""`python -m cognica` runs the `cognica` command line."""

from cognica.cli import main

raise SystemExit(main())
