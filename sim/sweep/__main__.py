"""`python -m sim.sweep`."""

from sim.sweep.cli import main

raise SystemExit(main())
