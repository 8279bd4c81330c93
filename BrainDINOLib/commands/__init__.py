"""The `braindino` subcommands, one module per capability; each module has `register(subparsers)`."""
from . import cohort, demo, engine, fewshot, heads, maps, serve, training

COMMAND_MODULES = [engine, training, maps, fewshot, heads, cohort, demo, serve]
