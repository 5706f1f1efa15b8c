"""Flow-based anomaly detection methods, one module each, behind a small registry."""

from methods.registry import FlowOutput, build_model, create_method, list_methods, register_method

from methods import msflow  # noqa: E402,F401  (registers "msflow")

__all__ = ["FlowOutput", "build_model", "create_method", "list_methods", "register_method"]
