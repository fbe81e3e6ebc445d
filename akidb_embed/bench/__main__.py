"""``python -m akidb_embed.bench [args]``: the same as ``akidb-embed bench [args]``."""
import sys

from akidb_embed.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
