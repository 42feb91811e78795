"""The operators of the analysis papers (methods-spec-3, issue 14): attention with a part taken away or
replaced — no token mixing, no dot product, a fixed map, a norm for the denominator, a state of size n — each
with its readable reference beside its fast path, in family ``analysis``.

| method | paper (spec §) | form | class | what it is |
|---|---|---|---|---|
| ``decon_mlp`` | Deconstructing Attention (§2) | layer | N | gated MLP per token, no token mixing |
| ``taylor2_attention`` | Deconstructing Attention (§2) | kernel | A | 2nd-order Taylor of exp, linear time (``normalization``: joint / separate) |
| ``decon_nonapprox`` | Deconstructing Attention (§2) | kernel | N | per-token scalar score, causal softmax over keys only |
| ``normalized_attention`` | DSF (§11) | kernel | N | η(n_i)·unnormalised linear attention (exp / softplus / sigmoid; η ≡ 1 anchor) |
| ``taylor_softmax`` | Softmax as an RNN (§9) | kernel | A | order-n Taylor softmax, parallel or recurrent (tends to softmax) |
| ``softmax_l2out`` | Softmax as an RNN (§9) | kernel | N | L2 norm of Σ exp(s) v in place of the denominator |
| ``softmax_divs_gate`` | Softmax as an RNN (§9) | kernel | N | exp numerator / visible-key count, sigmoid gate |
| ``gin_attention`` | GIN-Attention (§1a) | layer | N | softmax aggregation of x (mask after the learnable sharpening), per-head GIN MLP |
| ``latent_xattn``, ``latent_xattn_flash`` | Pooling and Attention (§4) | kernel | E | m queries over a long sequence, noncausal cross, key padding mask |
| ``plap_attention`` | p-adapter (§5) | kernel | N (E at p=2, μ=0) | p-Laplacian reweighted attention, Gram-matrix fast path |
| ``contmix1d`` | OverLoCK ContMix (§3) | layer | N | neighbourhood attention with region-key logits (1-D causal/full, 2-D) |

Elsewhere: the readouts ``pool_eos``, ``pool_mean``, ``pool_latent_last``, ``pool_latent_multilayer`` and
``histograph_readout`` (HISTOGRAPH §6, :mod:`.histograph`: depth attention over the layer history + node
self-attention), all ``history -> vector`` (``latent.make_readout``, the model option ``readout``); the Sparse-GIN
adapter (§1b, :mod:`.sparse_gin`) on a frozen all-MiniLM-L6-v2, as the experiment ``sparse_gin_minilm``
(``attnbench.tasks.sparse_gin``); the fixed-map variants ``decon_rndembqk``,
``decon_fixedseqqk``, ``decon_staticembqk`` and ``hybrid_schedule`` are options of the task model
(``attnbench.tasks.model``: ``qk_source``, ``hybrid_schedule``); the experiments ``icl_linreg_1layer_mh``,
``mqar_state_sweep`` and ``rf_attention_probe`` are tasks (``attnbench.tasks.analysis``).

Not implemented, on purpose: **LowFER** (§12, arXiv:2008.10858) has no attention content — it is a low-rank
bilinear scoring function for knowledge-graph triples (no sequence, no positions, no softmax over keys), and
its only honest use would need downloaded link-prediction data; **the single-layer universal approximation
theorem** (§10, arXiv:2507.10581) is a pure existence result with no rates, widths or experiments, so no finite
run can test it (a capacity probe would measure optimisation, not the theorem).
"""
from . import contmix, decon, dsf, gin, latent, plap, taylor  # noqa: F401
