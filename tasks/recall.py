"""Recall tasks of the causal self pattern: MQAR (Zoology) and a token-level needle in a haystack (RULER-style).

Both are written from the recipes in the project's methods spec (§16.1, §16.2); no code is taken from the
reference repositories.
"""
from __future__ import annotations

import torch

from .registry import IGNORE, Batch, Task, register_task


def distinct(batch: int, count: int, low: int, high: int, gen: torch.Generator) -> torch.Tensor:
    """``[batch, count]`` ids drawn without replacement from ``[low, high)``, per row."""
    return torch.rand(batch, high - low, generator=gen).argsort(dim=1)[:, :count] + low


@register_task("mqar")
class MQAR(Task):
    """Multi-query associative recall (Zoology): key-value pairs, then each key again; predict its value."""

    pattern = "causal_self"
    metric = "accuracy"
    defaults = {**Task.defaults, "seq_lens": [64], "vocab": 8192, "kv_pairs": 8, "power_a": 0.01,
                "random_non_queries": True, "conv": True, "mlp": False, "pos": "none", "steps": 600,
                "lr": 3e-3, "batch": 64}

    def setup(self):
        self.vocab = self.classes = self.int_param("vocab", 4)
        self.pairs = self.int_param("kv_pairs")
        self.power_a = self.float_param("power_a", 1e-6, 1.0)
        if self.seq % 2:
            raise self.error("seq_lens", f"must be even (Zoology's constraint), got {self.seq}")
        if 4 * self.pairs > self.seq:
            raise self.error("kv_pairs", f"4 * kv_pairs = {4 * self.pairs} exceeds the length {self.seq}")
        if self.vocab <= self.seq:
            raise self.error("vocab", f"must exceed the length {self.seq} (Zoology's constraint)")
        if self.vocab // 2 - 1 < self.pairs:
            raise self.error("vocab", f"too small for {self.pairs} distinct keys in [1, vocab/2)")

    def sample(self, batch, gen, split):
        seq, pairs, half = self.seq, self.pairs, self.vocab // 2
        keys = distinct(batch, pairs, 1, half, gen)
        values = distinct(batch, pairs, half, self.vocab, gen)
        full = torch.zeros(batch, seq + 1, dtype=torch.long)
        full[:, 0:2 * pairs:2], full[:, 1:2 * pairs:2] = keys, values
        slots = (seq - 2 * pairs) // 2  # a query takes two positions: the key, then its value
        gaps = torch.arange(slots, dtype=torch.float64)
        weights = self.power_a * (gaps + 1) ** (self.power_a - 1)
        chosen = torch.multinomial(weights.expand(batch, slots).float(), pairs, replacement=False, generator=gen)
        query_pos = 2 * pairs + 2 * chosen  # [batch, pairs]
        rows = torch.arange(batch)[:, None]
        full[rows, query_pos] = keys
        full[rows, query_pos + 1] = values
        targets = torch.full((batch, seq), IGNORE, dtype=torch.long)
        targets[rows, query_pos] = values
        inputs = full[:, :seq]
        if self.params["random_non_queries"]:
            filler = torch.randint(0, self.vocab, (batch, seq), generator=gen)
            used = torch.zeros(batch, seq, dtype=torch.bool)
            used[:, : 2 * pairs] = True
            used[rows, query_pos] = True
            used[rows, (query_pos + 1).clamp_max(seq - 1)] |= (query_pos + 1 < seq)
            inputs = torch.where(used, inputs, filler)
        return Batch(inputs=inputs, targets=targets)


@register_task("niah")
class NeedleInAHaystack(Task):
    """Token-level needle in a haystack: a key-value needle at a depth in random tokens, then the key as a
    question; the answer is the whole value (exact match), scored per depth (the depth x length grid)."""

    pattern = "causal_self"
    metric = "accuracy"
    match = "sequence"
    PAD, BOS, NEEDLE, QUERY, SEP = 0, 1, 2, 3, 4
    defaults = {**Task.defaults, "seq_lens": [64], "vocab": 512, "key_len": 2, "value_len": 4, "key_ids": 64,
                "value_ids": 64, "depths": 11, "conv": True, "mlp": False, "pos": "none", "steps": 400,
                "lr": 3e-3, "batch": 32}

    def setup(self):
        self.vocab = self.classes = self.int_param("vocab", 16)
        self.key_len, self.value_len = self.int_param("key_len"), self.int_param("value_len")
        self.key_ids, self.value_ids = self.int_param("key_ids", 2), self.int_param("value_ids", 2)
        self.depths = self.int_param("depths", 2)
        self.hay_low = 5 + self.key_ids + self.value_ids
        if self.hay_low + 2 > self.vocab:
            raise self.error("vocab", f"must exceed 5 + key_ids + value_ids + 2 = {self.hay_low + 2}")
        self.needle_len = 1 + self.key_len + 1 + self.value_len
        self.question_len = 1 + self.key_len + 1
        self.haystack = self.seq + 1 - 1 - self.needle_len - self.question_len - self.value_len
        if self.haystack < 1:
            raise self.error("seq_lens", f"{self.seq} leaves no haystack (needle and question take "
                                         f"{self.seq - self.haystack})")
        self.group_names = [f"depth={d / (self.depths - 1):.2f}" for d in range(self.depths)]

    def sample(self, batch, gen, split):
        k0, v0 = 5, 5 + self.key_ids
        keys = torch.randint(k0, k0 + self.key_ids, (batch, self.key_len), generator=gen)
        values = torch.randint(v0, v0 + self.value_ids, (batch, self.value_len), generator=gen)
        hay = torch.randint(self.hay_low, self.vocab, (batch, self.haystack), generator=gen)
        if split == "eval":  # the depth grid, in turn
            group = torch.arange(batch) % self.depths
        else:
            group = torch.randint(0, self.depths, (batch,), generator=gen)
        where = torch.round(group.float() / (self.depths - 1) * self.haystack).long()  # needle after `where` tokens
        needle = torch.cat([torch.full((batch, 1), self.NEEDLE), keys, torch.full((batch, 1), self.SEP), values], 1)
        question = torch.cat([torch.full((batch, 1), self.QUERY), keys, torch.full((batch, 1), self.SEP), values], 1)
        body_len = self.haystack + self.needle_len
        positions = torch.arange(body_len)[None, :]
        in_needle = (positions >= where[:, None]) & (positions < where[:, None] + self.needle_len)
        hay_index = (positions - in_needle.long().cumsum(1)).clamp(0, self.haystack - 1)
        needle_index = (positions - where[:, None]).clamp(0, self.needle_len - 1)
        body = torch.where(in_needle, needle.gather(1, needle_index), hay.gather(1, hay_index))
        full = torch.cat([torch.full((batch, 1), self.BOS), body, question], 1)  # length seq + 1
        inputs = full[:, :-1]
        targets = torch.full_like(inputs, IGNORE)
        first = full.shape[1] - 1 - self.value_len  # position whose next token is the first value
        targets[:, first:] = full[:, first + 1:]
        return Batch(inputs=inputs, targets=targets, groups=group)
