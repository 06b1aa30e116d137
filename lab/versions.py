"""The tool's name and version, one definition for both engines: what a result's `config.tool` (and so
a sweep point's config hash) and a recorded trace's `recording.tool_version` say. (The trace format's
own version is `traces.io.VERSION`: it belongs to the format, below both engines.)"""

TOOL_NAME = "moe-offload-lab"
TOOL_VERSION = "0.1.0"
TOOL = f"{TOOL_NAME} {TOOL_VERSION}"
