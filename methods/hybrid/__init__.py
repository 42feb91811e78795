"""Hybrid layers and token mixers (methods-spec §7, §13, §14): NAtS-L, MetaMixer, LaMamba."""
from . import lamamba, metamixer, nats_l  # noqa: F401
