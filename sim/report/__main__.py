"""`python -m sim.report`."""

from sim.report.cli import main

raise SystemExit(main())
