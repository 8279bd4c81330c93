"""The `braindino` subcommands, one module per capability; each module has `register(subparsers)`."""
from . import engine, maps, training

COMMAND_MODULES = [engine, training, maps]
