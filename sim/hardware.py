"""Hardware profiles live in `lab.hardware` (below both engines); this name stays importable."""

from lab.hardware import (  # noqa: F401
    GB,
    GIB,
    PROFILE_DIR,
    Cost,
    Fit,
    HardwareError,
    HardwareProfile,
    load_profile,
    presets,
)
