"""The `braindino` subcommands, one module per capability; each module has `register(subparsers)`."""
from . import engine

COMMAND_MODULES = [engine]
