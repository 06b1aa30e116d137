"""What both engines configure, below both: hardware profiles (`lab.hardware`) and cache sizes
(`lab.cache`). Torch-free and simpy-free (numpy and pydantic only, like `policies/` and `traces/`),
so the simulator (`sim/`) and the runtime (`runtime/`) read one definition instead of each keeping
its own: a calibrated profile written by the runtime is validated by the same model the simulator
loads, and a cache size means the same number of slots in both."""
