"""Where the server listens by default (shared by the server's config and the clients)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def default_endpoint() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return f"ipc://{Path(runtime) / 'akidb-embed.sock'}"
