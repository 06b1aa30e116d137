"""Cache sizes now live in `lab.cache` (below both engines); this name stays importable."""

from lab.cache import GIB, CacheConfig  # noqa: F401
