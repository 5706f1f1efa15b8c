"""Flow-based anomaly detection methods, one module each, behind a small registry."""

from methods.registry import FlowOutput, build_model, create_method, list_methods, register_method

from methods import msflow  # noqa: E402,F401  (registers "msflow")
from methods import fastflow  # noqa: E402,F401  (registers "fastflow")
from methods import csflow  # noqa: E402,F401  (registers "csflow")
from methods import cflow  # noqa: E402,F401  (registers "cflow")
from methods import uflow  # noqa: E402,F401  (registers "uflow")

__all__ = ["FlowOutput", "build_model", "create_method", "list_methods", "register_method"]
