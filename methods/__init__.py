"""Attention methods and their registry (see ``methods.registry``, the contract in ``methods.contract``).
Importing this registers the built-ins."""
from .contract import Extra, MaskInfo, Prepared, RecurrentDecode, StateScan, as_prepared, tensor_bytes
from .registry import METHODS, BuildContext, Capabilities, MethodSpec, UnknownOption, Unsupported, register_method
from . import analysis, exact, hybrid, linear, sparse  # noqa: F401

__all__ = ["METHODS", "BuildContext", "Capabilities", "Extra", "MaskInfo", "MethodSpec", "Prepared",
           "RecurrentDecode", "StateScan", "UnknownOption", "Unsupported", "as_prepared", "register_method", "tensor_bytes"]
