"""Hybrid layers and token mixers (methods-spec §7, §13, §14): NAtS-L, MetaMixer, LaMamba."""
from . import lamamba, metamixer  # noqa: F401
