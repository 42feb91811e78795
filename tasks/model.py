"""The small Transformer that hosts any registered attention method.

Kernel-form methods (``fn(q, k, v)``) are wrapped in query/key/value/output projections (:class:`MethodAttention`);
the method is built once per layer through its builder with a :class:`~attnbench.methods.BuildContext` for the
training shape (batch, heads, lengths, dtype), exactly as the kernel harness builds it, so compiled methods see
one shape. Per forward: the method's untimed ``prepare`` runs, as in the harness, and its declared extra inputs
are made. **An extra with a token axis** (``[B, H, S_kv, ...]``: gated linear attention's log-gates ``g``, the
delta rule's ``β``, ABC's slot scores, tensor attention's second key/value set) is, in the architectures these
methods come from, a projection of the layer's input, so here it is a learned one (:class:`ExtraProjection`):
``logsigmoid`` extras are ``logsigmoid(W x + 4)`` (a decay near 1 at initialisation, ≈ 0.98 per token),
``uniform`` ones ``sigmoid(W x)``, ``randn`` ones ``W x``. Random gates drawn afresh each step (what the kernel
harness feeds) would make the state forget within a few tokens and leave nothing for training to learn. Extras
without a token axis are drawn (seeded from the layer and the step). Layer-form methods
(``Capabilities.form == "layer"``) are the mixer themselves (over ``[batch, seq, d_model]``; self patterns only). Learnable tensors a builder lists in
``Prepared.parameters`` are trained with the model's own parameters.

``SelfModel``: embeddings, ``layers`` blocks (optional short convolution, the attention, an optional MLP), a
head per position or a class read at position 0. ``CrossModel``: an encoded source (embeddings, an optional
short convolution) and a decoder whose blocks cross-attend to it through the method (the CAB cross patterns:
queries from the decoder, keys and values from the source; causal cross is bottom-right aligned: decoder step
``t`` sees source positions ``<= t + seq_kv - seq_q``).

Model options (``MODEL_OPTIONS``; ``task_options.<task>.KEY`` or the train config's global key; absent unless
given, so they enter the case id only when set):

* ``hybrid_schedule``: which layers keep standard attention (:class:`StandardAttention`, SDPA with PyTorch's
  backend choice) while the others use the method — Deconstructing Attention's hybrids (App. P). A list of
  1-based layer ids, or a name: ``odd`` {1,3,…}, ``even`` {2,4,…}, ``first`` {1}, ``last`` {L}, ``bilateral``
  {1,L}, ``quarter`` (= ``25%``: L/4 evenly spaced layers ending at L, {4,8,…,24} at 24), ``top`` {1…L/2},
  ``middle`` {1…L/4, 3L/4+1…L}, ``bottom`` {L/2+1…L} (Tbl. 11's id lists), ``all``, ``none``.
* ``qk_source`` (self tasks, kernel-form methods, the method's layers): where Q and K come from —
  ``current`` (the layer input), ``static_emb`` (the token embeddings: StaticEmbQK), ``random_ref`` (a fixed
  N(0, I) reference sequence run through the same stack, its state before layer l giving layer l's Q and K, the
  same map for every example: RndEmbQK) or ``fixed_seq`` (the same with a fixed natural text, the bytes of
  Python's pydoc topics mod the vocabulary, embedded: FixedSeqQK; the paper's is FineWeb). V always comes from
  the layer input.
* ``readout`` (classification tasks): ``pool_eos``, ``pool_mean``, ``pool_latent_last``,
  ``pool_latent_multilayer``, ``histograph_readout`` (``attnbench.methods.analysis.latent``,
  ``...analysis.histograph``) in place of reading position 0: a ``history -> vector`` readout over the block
  outputs (each after the final LayerNorm), padding (the task's ``pad_id``) masked.
* ``qk_dim``: the per-head width of Q and K (the state-size axis of ``mqar_state_sweep``); V keeps
  ``d_model / heads``. The method's case then has ``head_dim = qk_dim``.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnbench.methods.case import Case

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def task_case(*, mode: str = "fwd_bwd", **fields) -> Case:
    """The harness's typed ``Case`` for the attention call a task layer makes (training: ``fwd_bwd``)."""
    return Case(mode=mode, **fields)


HYBRID_NAMES = ("odd", "even", "first", "last", "bilateral", "quarter", "25%", "top", "middle", "bottom", "all",
                "none")
QK_SOURCES = ("current", "static_emb", "random_ref", "fixed_seq")


def hybrid_layers(schedule, layers: int) -> list[int]:
    """The 1-based ids of the layers that keep standard attention under ``schedule`` (see module doc)."""
    if schedule is None or schedule == "none":
        return []
    if isinstance(schedule, (list, tuple)):
        ids = []
        for item in schedule:
            if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= layers:
                raise ValueError(f"layer ids must be integers in [1, {layers}], got {item!r}")
            ids.append(item)
        return sorted(set(ids))
    if schedule not in HYBRID_NAMES:
        raise ValueError(f"must be a list of 1-based layer ids or one of {', '.join(HYBRID_NAMES)}, got {schedule!r}")
    all_ids = list(range(1, layers + 1))
    half, quarter = layers // 2, layers // 4
    named = {
        "odd": all_ids[0::2], "even": all_ids[1::2], "first": [1], "last": [layers], "bilateral": sorted({1, layers}),
        "top": all_ids[:half], "bottom": all_ids[half:], "all": all_ids,
        "middle": all_ids[:quarter] + all_ids[layers - quarter:] if quarter else [],
    }
    if schedule in ("quarter", "25%"):
        count = max(1, round(layers / 4))
        return sorted({round(k * layers / count) for k in range(1, count + 1)})
    return named[schedule]


def check_model_options(task) -> None:
    """Validate the model options in ``task.params`` (``TaskParamError`` naming ``task_options.<task>.KEY``)."""
    p = task.params
    layers = int(p.get("layers", 1))
    if p.get("hybrid_schedule") is not None:
        try:
            hybrid_layers(p["hybrid_schedule"], layers)
        except ValueError as exc:
            raise task.error("hybrid_schedule", str(exc)) from None
    source = p.get("qk_source")
    if source is not None:
        if source not in QK_SOURCES:
            raise task.error("qk_source", f"must be one of {', '.join(QK_SOURCES)}, got {source!r}")
        if source != "current" and task.arch != "self":
            raise task.error("qk_source", "a fixed map needs a self-attention model (queries and keys from one sequence)")
    readout = p.get("readout")
    if readout is not None:
        from attnbench.methods.analysis.latent import READOUTS

        if readout not in READOUTS:
            raise task.error("readout", f"must be one of {', '.join(READOUTS)}, got {readout!r}")
        if task.readout != "cls" or task.arch != "self":
            raise task.error("readout", "a pooled readout needs a classification task over one sequence")
    qk_dim = p.get("qk_dim")
    if qk_dim is not None and (isinstance(qk_dim, bool) or not isinstance(qk_dim, int) or qk_dim < 1):
        raise task.error("qk_dim", f"must be a positive integer, got {qk_dim!r}")


def build_method(case: Case, device: torch.device, options: dict, params: dict, value_dim: int | None = None):
    """Build ``case.method`` for ``case`` -> (Prepared, caps). Raises the builder's ``Unsupported``.
    ``value_dim``: v's width where it differs from ``case.head_dim`` (q and k's; a model's ``qk_dim``)."""
    from attnbench import masks
    from attnbench.methods import METHODS, BuildContext, MaskInfo, as_prepared

    spec = masks.make_mask(case.mask)
    bound = spec.bind(case.seq_q, case.seq_kv).to(device)
    method = METHODS[case.method]
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=device, dtype=DTYPES[case.dtype],
                       options=options, params=dict(params), value_dim=value_dim)
    return as_prepared(method.build(ctx)), method.caps


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of ``x [B, H, S, D]`` at integer ``positions [S]`` (half-split form)."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half].float(), x[..., half:2 * half].float()
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half:].float()], dim=-1)
    return out.to(x.dtype)


class StandardAttention(nn.Module):
    """Standard multi-head softmax attention (SDPA, PyTorch's backend choice): the layers a ``hybrid_schedule``
    keeps. Causal self: ``is_causal``; causal cross: bottom-right aligned."""

    def __init__(self, d_model: int, heads: int, causal: bool, rope: bool = False):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not a multiple of heads={heads}")
        self.heads, self.head_dim, self.causal, self.rope = heads, d_model // heads, causal, rope
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))

    def forward(self, x, memory=None, qk_input=None):
        source = x if memory is None else memory
        batch, seq_q, width = x.shape
        seq_kv = source.shape[1]

        def heads(t, length):
            return t.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(x), seq_q), heads(self.k(source), seq_kv), heads(self.v(source), seq_kv)
        if self.rope:
            q = rotary(q, torch.arange(seq_q, device=x.device) + (seq_kv - seq_q))
            k = rotary(k, torch.arange(seq_kv, device=x.device))
        kwargs = {}
        if self.causal and seq_q == seq_kv:
            kwargs["is_causal"] = True
        elif self.causal:
            from torch.nn.attention.bias import causal_lower_right

            kwargs["attn_mask"] = causal_lower_right(seq_q, seq_kv)
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        return self.o(out.transpose(1, 2).reshape(batch, seq_q, width))


class ExtraProjection(nn.Module):
    """A token-axis extra input of a method as a learned map of the keys' source ``[B, S, d_model]`` -> the
    extra's shape, ``[B, H, S, *rest]`` (``bhsd`` methods) or ``[B, S, H, *rest]`` (``bshd``); the map per
    ``Extra.init`` is in the module doc."""

    GATE_BIAS = 4.0  # logsigmoid(4) = -0.018: the state keeps ~98 % per token at initialisation

    def __init__(self, d_model: int, extra, layout: str, device=None):
        super().__init__()
        self.layout, self.init = layout, extra.init
        self.heads = extra.shape[1] if layout == "bhsd" else extra.shape[2]
        self.rest = tuple(extra.shape[3:])
        self.dtype = getattr(torch, extra.dtype) if extra.dtype else None
        self.proj = nn.Linear(d_model, self.heads * math.prod(self.rest), bias=True, device=device)
        if self.init == "logsigmoid":
            nn.init.constant_(self.proj.bias, self.GATE_BIAS)
        else:
            nn.init.zeros_(self.proj.bias)

    def forward(self, source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        batch, seq, _ = source.shape
        t = self.proj(source).reshape(batch, seq, self.heads, *self.rest)
        if self.layout == "bhsd":
            t = t.transpose(1, 2)
        if self.init == "logsigmoid":
            t = F.logsigmoid(t.float())
        elif self.init == "uniform":
            t = torch.sigmoid(t.float())
        return t.to(self.dtype or dtype)


def token_extras(prepared, seq_kv: int, layout: str) -> list[str]:
    """The drawn (not constant) extras of ``prepared`` with a token axis of ``seq_kv`` keys (dim 2 in ``bhsd``,
    dim 1 in ``bshd``)."""
    axis = 2 if layout == "bhsd" else 1
    return [name for name, extra in prepared.extras.items()
            if len(extra.shape) >= 3 and extra.shape[axis] == seq_kv and extra.init not in ("ones", "zeros")]


def untrained_extras(task_name: str, method: str, prepared, caps, seq_kv: int, why: str) -> None:
    """Refuse a method whose extras have a token axis (``model.token_extras``: in a trained model, learned maps of
    the layer input) for a task that trains nothing around the method; ``why`` says what the task does instead. Its
    other extras are drawn (fixed) and its prepare step runs (``call_method``)."""
    from attnbench.methods import Unsupported

    learned = token_extras(prepared, seq_kv, caps.input_layout)
    if learned:
        names = ", ".join(repr(n) for n in learned)
        what = ("extra {} (one per key) would be a learned projection of the layer input, which needs"
                if len(learned) == 1 else
                "extras {} (one per key) would be learned projections of the layer input, which need").format(names)
        raise Unsupported(f"{task_name} {why}; {method}'s {what} training")


def extra_projections(d_model: int, prepared, names, layout: str, device=None) -> nn.ModuleDict:
    """One :class:`ExtraProjection` (from ``d_model``-wide inputs) per extra in ``names`` (token extras)."""
    return nn.ModuleDict({name: ExtraProjection(d_model, prepared.extras[name], layout, device=device)
                          for name in names})


def draw_extras(prepared, skip, seed: int, calls: int, device, dtype: torch.dtype) -> dict:
    """The extras of ``prepared`` not named in ``skip`` (those are learned maps), drawn: seeded from ``seed``, the
    extra's name and ``calls`` (a fresh draw per call as ``calls`` counts up; the same draw for a fixed ``calls``)."""
    tensors = {}
    for name, extra in prepared.extras.items():
        if name in skip:
            continue
        gen = torch.Generator(device=device).manual_seed(
            (seed * 1_000_003 + zlib.crc32(name.encode()) + 7919 * calls) % (2**63))
        tensors[name] = extra.make(gen, device, dtype)
    return tensors


def call_method(prepared, layout: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: dict):
    """One call of a kernel-form method on q, k, v ``[B, H, S, D]`` with its ``extras`` (already in the method's
    ``layout``): q, k, v laid out as the method takes them, its untimed ``prepare`` (no gradient, as in the
    harness), then ``fn``; the output back in ``[B, H, S, D]``."""
    bshd = layout == "bshd"
    if bshd:
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    kwargs = dict(extras)
    if prepared.prepare is not None:
        with torch.no_grad():
            kwargs.update(prepared.prepare(q, k, v, **kwargs) or {})
    out = prepared.fn(q, k, v, **kwargs)
    return out.transpose(1, 2) if bshd else out


class MethodAttention(nn.Module):
    """Multi-head attention whose core is a registered kernel-form method (projections around it)."""

    def __init__(self, d_model: int, heads: int, case: Case, device, options: dict, params: dict,
                 rope: bool = False, qk_dim: int | None = None):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not a multiple of heads={heads}")
        self.heads, self.head_dim = heads, d_model // heads
        self.qk_dim = qk_dim or self.head_dim
        self.q = nn.Linear(d_model, heads * self.qk_dim, bias=False)
        self.k = nn.Linear(d_model, heads * self.qk_dim, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        self.case, self.rope = case, rope
        self.dtype = DTYPES[case.dtype]
        self.prepared, self.caps = build_method(case, torch.device(device), options, params,
                                                value_dim=self.head_dim if self.qk_dim != self.head_dim else None)
        self.method_parameters = [p for p in self.prepared.parameters if isinstance(p, torch.Tensor) and p.requires_grad]
        layout = self.caps.input_layout
        self.extra_maps = extra_projections(d_model, self.prepared,
                                            token_extras(self.prepared, case.seq_kv, layout), layout, device=device)
        self.calls = 0

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                qk_input: torch.Tensor | None = None) -> torch.Tensor:
        """``qk_input``: where Q and K come from (a fixed map: the reference's or the embeddings' states,
        ``[1 or B, seq, d_model]``); V always from ``x`` (self) or ``memory`` (cross)."""
        source = x if memory is None else memory
        batch, seq_q, width = x.shape
        seq_kv = source.shape[1]

        def heads(t, length, dim):
            return t.reshape(batch, length, self.heads, dim).transpose(1, 2)

        qk_from, qk_kv = (x, source) if qk_input is None else (qk_input.expand(batch, -1, -1),) * 2
        q = heads(self.q(qk_from), seq_q, self.qk_dim)
        k = heads(self.k(qk_kv), seq_kv, self.qk_dim)
        v = heads(self.v(source), seq_kv, self.head_dim)
        if self.rope:  # bottom-right alignment: query i sits at key position i + seq_kv - seq_q
            q = rotary(q, torch.arange(seq_q, device=x.device) + (seq_kv - seq_q))
            k = rotary(k, torch.arange(seq_kv, device=x.device))
        q, k, v = (t.to(self.dtype) for t in (q, k, v))
        kwargs = draw_extras(self.prepared, self.extra_maps, self.case.seed, self.calls, x.device, self.dtype)
        for name, projection in self.extra_maps.items():  # learned maps of the input
            kwargs[name] = projection(source, self.dtype)
        self.calls += 1
        out = call_method(self.prepared, self.caps.input_layout, q, k, v, kwargs)
        out = out.transpose(1, 2).reshape(batch, seq_q, width).to(x.dtype)
        return self.o(out)


class LayerMethod(nn.Module):
    """A layer-form method used as the mixer directly (self patterns): ``fn(x)`` over ``[batch, seq, d_model]``."""

    def __init__(self, case: Case, device, options: dict, params: dict):
        super().__init__()
        self.case = case
        self.dtype = DTYPES[case.dtype]
        self.prepared, self.caps = build_method(case, torch.device(device), options, params)
        self.method_parameters = [p for p in self.prepared.parameters if isinstance(p, torch.Tensor) and p.requires_grad]
        self.calls = 0

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, qk_input=None) -> torch.Tensor:
        if memory is not None:
            raise RuntimeError("a layer-form method cannot cross-attend")
        if qk_input is not None:
            raise RuntimeError("a layer-form method takes no fixed map (qk_source)")
        kwargs = {}
        for name, extra in self.prepared.extras.items():
            gen = torch.Generator(device=x.device).manual_seed(self.case.seed * 31 + 7919 * self.calls)
            kwargs[name] = extra.make(gen, x.device, self.dtype)
        if self.prepared.prepare is not None:
            with torch.no_grad():
                kwargs.update(self.prepared.prepare(x.to(self.dtype), **kwargs) or {})
        self.calls += 1
        return self.prepared.fn(x.to(self.dtype), **kwargs).to(x.dtype)


class ShortConv(nn.Module):
    """Depthwise convolution over the sequence, kernel 3: causal (sees the two previous tokens) or centred."""

    def __init__(self, d_model: int, causal: bool, kernel: int = 3):
        super().__init__()
        self.causal, self.kernel = causal, kernel
        self.conv = nn.Conv1d(d_model, d_model, kernel, groups=d_model, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2)
        pad = (self.kernel - 1, 0) if self.causal else ((self.kernel - 1) // 2, self.kernel // 2)
        return self.conv(F.pad(y, pad)).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.up, self.down = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm residual block: [short conv], attention (self, or cross to ``memory``), [MLP]."""

    def __init__(self, d_model: int, mixer: nn.Module, conv: bool, causal: bool, mlp: bool):
        super().__init__()
        self.conv = ShortConv(d_model, causal) if conv else None
        self.norm_conv = nn.LayerNorm(d_model) if conv else None
        self.norm_mix = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.mlp = MLP(d_model) if mlp else None
        self.norm_mlp = nn.LayerNorm(d_model) if mlp else None

    def forward(self, x, memory=None, qk_input=None):
        if self.conv is not None:
            x = x + self.conv(self.norm_conv(x))
        if qk_input is not None and isinstance(self.mixer, MethodAttention):
            x = x + self.mixer(self.norm_mix(x), memory, qk_input=self.norm_mix(qk_input))
        else:
            x = x + self.mixer(self.norm_mix(x), memory)
        if self.mlp is not None:
            x = x + self.mlp(self.norm_mlp(x))
        return x


def make_mixer(layer: int, d_model: int, heads: int, case: Case, device, options, params, rope,
               standard: bool = False, causal: bool = False, qk_dim: int | None = None, fixed_map: bool = False):
    """Layer ``layer``'s mixer: standard attention (a hybrid schedule's layer) or the method."""
    from attnbench.methods import METHODS, Unsupported

    if standard:
        return StandardAttention(d_model, heads, causal, rope=rope)
    case = task_case(**{**case.__dict__, "seed": case.seed * 1000 + layer})
    if METHODS[case.method].caps.form == "layer":
        if fixed_map:
            raise Unsupported("qk_source: a fixed map needs a kernel-form method (a layer-form method makes its own Q, K)")
        if qk_dim is not None:
            raise Unsupported("qk_dim: a layer-form method has no Q/K width to set")
        return LayerMethod(case, device, options, params)
    if qk_dim is not None:
        case = task_case(**{**case.__dict__, "head_dim": qk_dim})
    return MethodAttention(d_model, heads, case, device, options, params, rope=rope, qk_dim=qk_dim)


def _blocks(task, case, device, options, params, conv: bool, causal: bool):
    """The model's blocks, with the hybrid schedule's standard layers in place."""
    p = task.params
    d_model, layers = int(p["d_model"]), int(p["layers"])
    standard = set(hybrid_layers(p.get("hybrid_schedule"), layers))
    fixed_map = (p.get("qk_source") or "current") != "current"
    return nn.ModuleList(
        Block(d_model, make_mixer(i, d_model, int(p["heads"]), case, device, options, params, "rope" in p["pos"],
                                  standard=(i + 1) in standard, causal=causal, qk_dim=p.get("qk_dim"),
                                  fixed_map=fixed_map),
              conv, causal, bool(p["mlp"]))
        for i in range(layers))


def fixed_text_ids(length: int, vocab: int) -> torch.Tensor:
    """A fixed natural text as ids: the bytes of Python's pydoc topics (offline, in the standard library), mod
    ``vocab``, repeated to ``length`` if short."""
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics)).encode("utf-8")
    data = torch.tensor(list(text[: max(length, 1)]), dtype=torch.long)
    if data.numel() < length:
        data = data.repeat(-(-length // data.numel()))
    return data[:length] % vocab


class SelfModel(nn.Module):
    """Embeddings, blocks with the method as self-attention, a head per position or a class at position 0."""

    def __init__(self, task, case: Case, device, options: dict, params: dict):
        super().__init__()
        p = task.params
        d_model, seq = int(p["d_model"]), task.seq_q
        self.embed = nn.Embedding(task.vocab, d_model)
        self.pos = nn.Embedding(seq, d_model) if "learned" in p["pos"] else None
        causal = task.pattern.startswith("causal")
        self.blocks = _blocks(task, case, device, options, params, bool(p["conv"]), causal)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, task.classes)
        self.readout = task.readout
        self.qk_source = p.get("qk_source") or "current"
        if self.qk_source == "random_ref":  # fixed N(0, I) embeddings (sigma unverified in the paper: 1)
            gen = torch.Generator().manual_seed(case.seed * 7919 + 17)
            self.register_buffer("reference", torch.randn(1, seq, d_model, generator=gen))
        elif self.qk_source == "fixed_seq":
            self.register_buffer("reference_ids", fixed_text_ids(seq, task.vocab)[None])
        self.pool = None
        if p.get("readout"):
            from attnbench.methods.analysis.latent import make_readout

            self.pool = make_readout(p["readout"], d_model, int(p["layers"]), heads=int(p["heads"]))
        self.pad_id = task.pad_id

    def quality_extras(self) -> dict:
        """Secondary numbers the model reports into its quality row's extras (the HISTOGRAPH guard count)."""
        fired = getattr(self.pool, "guard_fired", None)
        return {} if fired is None else {"histograph_guard_fired": int(fired)}

    def _embed(self, ids=None, vectors=None):
        x = self.embed(ids) if vectors is None else vectors
        if self.pos is not None:
            x = x + self.pos.weight[None, : x.shape[1]]
        return x

    def forward(self, batch) -> torch.Tensor:
        x = self._embed(batch.inputs)
        qk = None
        if self.qk_source == "static_emb":
            qk = x
        elif self.qk_source == "random_ref":
            qk = self._embed(vectors=self.reference[:, : x.shape[1]])
        elif self.qk_source == "fixed_seq":
            qk = self._embed(self.reference_ids[:, : x.shape[1]])
        history = []
        for block in self.blocks:
            if qk is None:
                x = block(x)
            else:
                x = block(x, qk_input=qk)
                if self.qk_source != "static_emb":  # the reference goes through the same stack with its own Q, K
                    qk = block(qk.expand(x.shape[0], -1, -1))[:1]
            history.append(x)
        if self.pool is not None:
            valid = None if self.pad_id is None else batch.inputs != self.pad_id
            return self.head(self.pool([self.norm(h) for h in history], valid))
        x = self.norm(x)
        return self.head(x[:, 0] if self.readout == "cls" else x)


class CrossModel(nn.Module):
    """A source encoder (embeddings, optional short convolution) and a decoder that cross-attends to it."""

    def __init__(self, task, case: Case, device, options: dict, params: dict):
        super().__init__()
        from attnbench.methods import METHODS

        if METHODS[case.method].caps.form == "layer":
            from attnbench.methods import Unsupported

            raise Unsupported("a layer-form method has no cross-attention form (queries and keys from one sequence)")
        p = task.params
        d_model = int(p["d_model"])
        self.src_embed = nn.Embedding(task.vocab, d_model)
        self.tgt_embed = nn.Embedding(task.decoder_vocab, d_model)
        learned = "learned" in p["pos"]
        self.src_pos = nn.Embedding(task.seq_kv, d_model) if learned else None
        self.tgt_pos = nn.Embedding(task.seq_q, d_model) if learned else None
        self.src_conv = ShortConv(d_model, causal=task.pattern.startswith("causal")) if p.get("src_conv") else None
        self.src_norm = nn.LayerNorm(d_model)
        self.blocks = _blocks(task, case, device, options, params, False, task.pattern.startswith("causal"))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, task.classes)

    def forward(self, batch) -> torch.Tensor:
        memory = self.src_embed(batch.inputs)
        if self.src_pos is not None:
            memory = memory + self.src_pos.weight[None, : memory.shape[1]]
        if self.src_conv is not None:
            memory = memory + self.src_conv(memory)
        memory = self.src_norm(memory)
        x = self.tgt_embed(batch.decoder_inputs)
        if self.tgt_pos is not None:
            x = x + self.tgt_pos.weight[None, : x.shape[1]]
        for block in self.blocks:
            x = block(x, memory)
        return self.head(self.norm(x))


def build_model(task, case: Case, device, options: dict, params: dict) -> nn.Module:
    model_cls = CrossModel if task.arch == "cross" else SelfModel
    return model_cls(task, case, device, options, params).to(device)


def method_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Learnable tensors the methods' builders made (``Prepared.parameters``), not already module parameters."""
    own = {id(p) for p in model.parameters()}
    found = []
    for module in model.modules():
        for tensor in getattr(module, "method_parameters", ()):
            if id(tensor) not in own:
                own.add(id(tensor))
                found.append(tensor)
    return found


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) + sum(t.numel() for t in method_parameters(model))
