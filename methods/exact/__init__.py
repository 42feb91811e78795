"""Exact attention: the fp32 reference, eager, PyTorch SDPA backends, FlexAttention, flash-attn."""
from . import eager, flash_attn, flex, flex_split, reference, sdpa, sdpa_split, torch_varlen  # noqa: F401
