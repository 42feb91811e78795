"""Attention methods and their registry (see ``methods.registry``). Importing this registers the built-ins."""
from .registry import METHODS, BuildContext, Capabilities, MethodSpec, Unsupported, register_method
from . import exact  # noqa: F401

__all__ = ["METHODS", "BuildContext", "Capabilities", "MethodSpec", "Unsupported", "register_method"]
