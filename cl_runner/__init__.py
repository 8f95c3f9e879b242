"""cl_runner: a config-driven experiment runner for continual learning."""
from .identity import register_resolver

__version__ = "0.1.0"
# conf/config.yaml names sweep job folders through this resolver: every process that loads the config tree
# (cl-run, tests composing it, launcher workers) imports this package first
register_resolver()
