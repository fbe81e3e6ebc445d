"""The supervisor: client socket, worker processes, routing, deadlines, restarts."""
from akidb_embed.supervisor.app import Supervisor
from akidb_embed.supervisor.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "Supervisor", "load_config"]
