"""Worker processes: one model runtime each, behind the Backend interface (see backends/base.py)."""
