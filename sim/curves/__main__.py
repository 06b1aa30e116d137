"""`python -m sim.curves`."""

from sim.curves import main

raise SystemExit(main())
