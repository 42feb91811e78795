"""The small Transformer that hosts any registered attention method.

Kernel-form methods (``fn(q, k, v)``) are wrapped in query/key/value/output projections (:class:`MethodAttention`);
the method is built once per layer through its builder with a :class:`~attnbench.methods.BuildContext` for the
training shape (batch, heads, lengths, dtype), exactly as the kernel harness builds it, so compiled methods see
one shape. Per forward: the method's declared extra inputs are drawn (seeded from the layer and the step) and its
untimed ``prepare`` runs, as in the harness. Layer-form methods (``Capabilities.form == "layer"``) are the mixer
themselves (over ``[batch, seq, d_model]``; self patterns only). Learnable tensors a builder lists in
``Prepared.parameters`` are trained with the model's own parameters.

``SelfModel``: embeddings, ``layers`` blocks (optional short convolution, the attention, an optional MLP), a
head per position or a class read at position 0. ``CrossModel``: an encoded source (embeddings, an optional
short convolution) and a decoder whose blocks cross-attend to it through the method (the CAB cross patterns:
queries from the decoder, keys and values from the source; causal cross is bottom-right aligned: decoder step
``t`` sees source positions ``<= t + seq_kv - seq_q``).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class AttentionCase:
    """The attention call a layer makes, with the fields of the harness's ``Case`` that builders read."""

    method: str
    mask: str
    mask_name: str
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_kv: int
    head_dim: int
    dtype: str
    mode: str = "fwd_bwd"
    layout: str = "single"
    world_size: int = 1
    seed: int = 0
    device: str = "cpu"

    @property
    def needs_grad(self) -> bool:
        return self.mode in ("bwd", "fwd_bwd")

    def input_key(self) -> tuple:
        return (self.mask, self.batch, self.heads_q, self.heads_kv, self.seq_q, self.seq_kv, self.head_dim,
                self.dtype, self.seed)


def build_method(case: AttentionCase, device: torch.device, options: dict, params: dict):
    """Build ``case.method`` for ``case`` -> (Prepared, caps). Raises the builder's ``Unsupported``."""
    from attnbench import masks
    from attnbench.methods import METHODS, BuildContext, MaskInfo, as_prepared

    spec = masks.make_mask(case.mask)
    bound = spec.bind(case.seq_q, case.seq_kv).to(device)
    method = METHODS[case.method]
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=device, dtype=DTYPES[case.dtype],
                       options=options, params=dict(params))
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


class MethodAttention(nn.Module):
    """Multi-head attention whose core is a registered kernel-form method (projections around it)."""

    def __init__(self, d_model: int, heads: int, case: AttentionCase, device, options: dict, params: dict,
                 rope: bool = False):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not a multiple of heads={heads}")
        self.heads, self.head_dim = heads, d_model // heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        self.case, self.rope = case, rope
        self.dtype = DTYPES[case.dtype]
        self.prepared, self.caps = build_method(case, torch.device(device), options, params)
        self.method_parameters = [p for p in self.prepared.parameters if isinstance(p, torch.Tensor) and p.requires_grad]
        self.calls = 0

    def _extras(self, device) -> dict:
        tensors = {}
        for name, extra in self.prepared.extras.items():
            seed = (self.case.seed * 1_000_003 + zlib.crc32(name.encode()) + 7919 * self.calls) % (2**63)
            gen = torch.Generator(device=device).manual_seed(seed)
            tensors[name] = extra.make(gen, device, self.dtype)
        return tensors

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        source = x if memory is None else memory
        batch, seq_q, width = x.shape
        seq_kv = source.shape[1]

        def heads(t, length):
            return t.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(x), seq_q), heads(self.k(source), seq_kv), heads(self.v(source), seq_kv)
        if self.rope:  # bottom-right alignment: query i sits at key position i + seq_kv - seq_q
            q = rotary(q, torch.arange(seq_q, device=x.device) + (seq_kv - seq_q))
            k = rotary(k, torch.arange(seq_kv, device=x.device))
        q, k, v = (t.to(self.dtype) for t in (q, k, v))
        bshd = self.caps.input_layout == "bshd"
        if bshd:
            q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        kwargs = self._extras(x.device)
        if self.prepared.prepare is not None:
            with torch.no_grad():
                kwargs.update(self.prepared.prepare(q, k, v, **kwargs) or {})
        self.calls += 1
        out = self.prepared.fn(q, k, v, **kwargs)
        if bshd:
            out = out.transpose(1, 2)
        out = out.transpose(1, 2).reshape(batch, seq_q, width).to(x.dtype)
        return self.o(out)


class LayerMethod(nn.Module):
    """A layer-form method used as the mixer directly (self patterns): ``fn(x)`` over ``[batch, seq, d_model]``."""

    def __init__(self, case: AttentionCase, device, options: dict, params: dict):
        super().__init__()
        self.case = case
        self.dtype = DTYPES[case.dtype]
        self.prepared, self.caps = build_method(case, torch.device(device), options, params)
        self.method_parameters = [p for p in self.prepared.parameters if isinstance(p, torch.Tensor) and p.requires_grad]
        self.calls = 0

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        if memory is not None:
            raise RuntimeError("a layer-form method cannot cross-attend")
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

    def forward(self, x, memory=None):
        if self.conv is not None:
            x = x + self.conv(self.norm_conv(x))
        x = x + self.mixer(self.norm_mix(x), memory)
        if self.mlp is not None:
            x = x + self.mlp(self.norm_mlp(x))
        return x


def make_mixer(layer: int, d_model: int, heads: int, case: AttentionCase, device, options, params, rope):
    from attnbench.methods import METHODS

    case = AttentionCase(**{**case.__dict__, "seed": case.seed * 1000 + layer})
    if METHODS[case.method].caps.form == "layer":
        return LayerMethod(case, device, options, params)
    return MethodAttention(d_model, heads, case, device, options, params, rope=rope)


class SelfModel(nn.Module):
    """Embeddings, blocks with the method as self-attention, a head per position or a class at position 0."""

    def __init__(self, task, case: AttentionCase, device, options: dict, params: dict):
        super().__init__()
        p = task.params
        d_model, seq = int(p["d_model"]), task.seq_q
        self.embed = nn.Embedding(task.vocab, d_model)
        self.pos = nn.Embedding(seq, d_model) if "learned" in p["pos"] else None
        causal = task.pattern.startswith("causal")
        self.blocks = nn.ModuleList(
            Block(d_model, make_mixer(i, d_model, int(p["heads"]), case, device, options, params, "rope" in p["pos"]),
                  bool(p["conv"]), causal, bool(p["mlp"]))
            for i in range(int(p["layers"])))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, task.classes)
        self.readout = task.readout

    def forward(self, batch) -> torch.Tensor:
        x = self.embed(batch.inputs)
        if self.pos is not None:
            x = x + self.pos.weight[None, : x.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0] if self.readout == "cls" else x)


class CrossModel(nn.Module):
    """A source encoder (embeddings, optional short convolution) and a decoder that cross-attends to it."""

    def __init__(self, task, case: AttentionCase, device, options: dict, params: dict):
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
        self.blocks = nn.ModuleList(
            Block(d_model, make_mixer(i, d_model, int(p["heads"]), case, device, options, params, "rope" in p["pos"]),
                  False, True, bool(p["mlp"]))
            for i in range(int(p["layers"])))
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


def build_model(task, case: AttentionCase, device, options: dict, params: dict) -> nn.Module:
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
