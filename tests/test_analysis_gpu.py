"""The analysis operators on a CUDA GPU (pytest -m gpu; scripts/device_analysis.sh with GPU_TESTS=1): every method
passes its gate in bf16 (fwd_bwd, full and causal), and latent cross-attention at head dim 2048 is an
``unsupported`` row for the flash backend and an ``ok`` row for PyTorch's own backend choice."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from attnbench.execute.runner import run_sweep

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NEW = ["taylor2_attention", "decon_nonapprox", "normalized_attention", "taylor_softmax", "softmax_l2out",
       "softmax_divs_gate", "plap_attention", "gin_attention", "decon_mlp", "contmix1d"]


def test_every_operator_passes_its_gate_in_bf16(cfg):
    cfg.update(methods=NEW, masks=["full", "causal"], seq_lens=[1024], modes=["fwd_bwd"], heads_q=4, head_dim=64,
               dtype="bfloat16", device="cuda")
    frame = pd.read_parquet(run_sweep(cfg, "test", show_progress=False) / "rows.parquet")
    bad = frame[frame.status != "ok"][["method", "mask", "status", "reason"]]
    assert bad.empty, bad.to_string()


def test_latent_cross_attention_at_head_dim_2048(cfg):
    cfg.update(methods=["latent_xattn", "latent_xattn_flash"], masks=["full"], seq_lens=[], cross_lens=[[64, 4096]],
               head_dim=[128, 2048], modes=["fwd"], heads_q=4, dtype="bfloat16", device="cuda")
    frame = pd.read_parquet(run_sweep(cfg, "test", show_progress=False) / "rows.parquet")
    rows = frame.set_index(["method", "head_dim"])
    assert rows.loc[("latent_xattn", 128), "status"] == "ok"
    assert rows.loc[("latent_xattn", 2048), "status"] == "ok"
    assert rows.loc[("latent_xattn_flash", 128), "status"] == "ok"
    assert rows.loc[("latent_xattn_flash", 2048), "status"] == "unsupported"
