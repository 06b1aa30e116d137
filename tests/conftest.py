"""Test-session settings.

One intra-op thread for torch (and every subprocess a test starts): the runtime's tests run tiny
models, where OpenMP's threads cost more than they give, and on a busy machine (CI's 2 cores, or
several suites at once) spinning threads multiply the suite's time. Results do not depend on it:
every exactness test compares runs made in the same process or with the same setting."""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
