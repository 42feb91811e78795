"""Cross tasks: a decoder (queries) attends to an encoded source (keys, values) with seq_q != seq_kv.

Noncausal cross: sorting with pointer attention (§16.6: each output step must point at the successor of the
value it was given, among the source's values) and dictionary lookup (recall across sequences). Causal cross
(streaming, monotonic alignment; bottom-right: decoder step ``t`` sees source positions ``<= t + lead`` with
``lead = seq_kv - seq_q``): delayed copy and chunk-reversed copy, both reading only the source prefix so far.
The decoder's inputs are the previous targets (teacher forcing; a BOS id first) unless said otherwise.
"""
from __future__ import annotations

import torch

from .recall import distinct
from .registry import Batch, Task, register_task

CROSS_DEFAULTS = {**Task.defaults, "layers": 2, "mlp": True, "src_conv": False}


def shifted(targets: torch.Tensor, bos: int) -> torch.Tensor:
    """Teacher forcing: [BOS, targets[:, :-1]]."""
    return torch.cat([torch.full_like(targets[:, :1], bos), targets[:, :-1]], dim=1)


@register_task("sort")
class Sort(Task):
    """Sorting with pointer attention: the source holds distinct values; output step t gives the t-th smallest,
    fed the (t-1)-th: its cross-attention must point at the smallest source value above the one it was given.
    ``outputs``: how many of the smallest values to emit (default half the source, so seq_q != seq_kv)."""

    pattern = "noncausal_cross"
    metric = "accuracy"
    match = "sequence"  # exact-sequence accuracy, the pointer-network metric (a value's successor is often near)
    arch = "cross"
    defaults = {**CROSS_DEFAULTS, "seq_lens": [16], "vocab": 32, "outputs": 0, "pos": "none", "steps": 500,
                "lr": 3e-3, "batch": 64}

    def setup(self):
        self.values = self.int_param("vocab", 2)
        if self.values < self.seq:
            raise self.error("vocab", f"must be at least the length {self.seq} (distinct values)")
        outputs = self.params["outputs"] or self.seq // 2
        if not 1 <= outputs < self.seq:
            raise self.error("outputs", f"must be in [1, {self.seq - 1}] (0: half the length), got {outputs}")
        self.vocab, self.classes, self.decoder_vocab = self.values, self.values, self.values + 1
        self.seq_kv, self.seq_q = self.seq, outputs

    def sample(self, batch, gen, split):
        source = distinct(batch, self.seq, 0, self.values, gen)
        targets = source.sort(dim=1).values[:, : self.seq_q]
        return Batch(inputs=source, targets=targets, decoder_inputs=shifted(targets, self.values))


@register_task("lookup")
class Lookup(Task):
    """Dictionary lookup across sequences: the source is key-value pairs k1 v1 ... kD vD; the decoder is given
    ``queries`` of the keys and must return their values (associative recall through cross-attention; the source
    has a short centred convolution so that a value knows its key)."""

    pattern = "noncausal_cross"
    metric = "accuracy"
    arch = "cross"
    defaults = {**CROSS_DEFAULTS, "seq_lens": [32], "vocab": 128, "queries": 0, "pos": "none", "src_conv": True,
                "steps": 500, "lr": 1e-2, "batch": 64}

    def setup(self):
        self.vocab = self.classes = self.decoder_vocab = self.int_param("vocab", 4)
        if self.seq % 2:
            raise self.error("seq_lens", f"must be even (key-value pairs), got {self.seq}")
        self.pairs = self.seq // 2
        if self.vocab // 2 < self.pairs:
            raise self.error("vocab", f"must be at least 2 * pairs = {2 * self.pairs} (distinct keys)")
        queries = self.params["queries"] or max(1, self.pairs // 2)
        if not 1 <= queries <= self.pairs:
            raise self.error("queries", f"must be in [1, {self.pairs}] (0: half the pairs), got {queries}")
        self.seq_kv, self.seq_q = self.seq, queries

    def sample(self, batch, gen, split):
        half = self.vocab // 2
        keys = distinct(batch, self.pairs, 0, half, gen)
        values = torch.randint(half, self.vocab, (batch, self.pairs), generator=gen)
        source = torch.stack([keys, values], dim=2).reshape(batch, self.seq)
        asked = torch.rand(batch, self.pairs, generator=gen).argsort(1)[:, : self.seq_q]
        return Batch(inputs=source, targets=values.gather(1, asked), decoder_inputs=keys.gather(1, asked))


class _Streaming(Task):
    pattern = "causal_cross"
    metric = "accuracy"
    arch = "cross"

    def _streaming_setup(self, minimum_lead: int):
        self.vocab = self.classes = self.int_param("vocab", 2)
        self.decoder_vocab = self.vocab + 1
        self.lead = self.int_param("lead", minimum_lead)
        if self.lead >= self.seq:
            raise self.error("lead", f"must be below the length {self.seq}, got {self.lead}")
        self.seq_kv, self.seq_q = self.seq, self.seq - self.lead

    def source_index(self) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, batch, gen, split):
        source = torch.randint(0, self.vocab, (batch, self.seq), generator=gen)
        targets = source[:, self.source_index()]
        return Batch(inputs=source, targets=targets, decoder_inputs=shifted(targets, self.vocab))


@register_task("delayed_copy")
class DelayedCopy(_Streaming):
    """Streaming delayed copy: decoder step t sees the source up to t + lead and emits source[t + lead - delay]."""

    defaults = {**CROSS_DEFAULTS, "seq_lens": [32], "vocab": 16, "lead": 4, "delay": 2, "pos": "learned+rope",
                "steps": 400, "lr": 3e-3, "batch": 32}

    def setup(self):
        self._streaming_setup(0)
        self.delay = self.int_param("delay", 0)
        if self.delay > self.lead:
            raise self.error("delay", f"must be at most lead={self.lead} (the first step reads source[lead - delay])")

    def source_index(self):
        return torch.arange(self.seq_q) + self.lead - self.delay


@register_task("chunk_reverse")
class ChunkReverse(_Streaming):
    """Streaming chunk-reversed copy: the source in chunks of ``chunk``; output step t emits, reversed within its
    chunk, the position ``u = t + lead - chunk`` (always inside the visible prefix, as ``lead >= chunk``)."""

    defaults = {**CROSS_DEFAULTS, "seq_lens": [32], "vocab": 16, "lead": 4, "chunk": 4, "pos": "learned+rope",
                "steps": 500, "lr": 3e-3, "batch": 32}

    def setup(self):
        self.chunk = self.int_param("chunk")
        self._streaming_setup(self.chunk)

    def source_index(self):
        u = torch.arange(self.seq_q) + self.lead - self.chunk
        return (u // self.chunk) * self.chunk + (self.chunk - 1 - u % self.chunk)
