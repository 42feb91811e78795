"""Causal self tasks over one stream: selective copying (Mamba, §16.4) and character-level language modelling
in bits per character on a text that ships with Python itself (the standard library's pydoc topics: the
language reference and library docs, about 465,000 characters; nothing is downloaded)."""
from __future__ import annotations

import functools

import torch

from .registry import IGNORE, Batch, Task, register_task


@register_task("selective_copy")
class SelectiveCopy(Task):
    """Selective copying: data tokens scattered among blanks, then markers; at the i-th marker emit the i-th data
    token (alphabet: 0 blank, 1..A-2 data, A-1 marker)."""

    pattern = "causal_self"
    metric = "accuracy"
    defaults = {**Task.defaults, "seq_lens": [64], "alphabet": 16, "tokens": 16, "steps": 600, "lr": 3e-3,
                "batch": 64}

    def setup(self):
        self.alphabet = self.int_param("alphabet", 4)
        self.count = self.int_param("tokens")
        self.vocab = self.classes = self.alphabet
        if 2 * self.count > self.seq:
            raise self.error("tokens", f"2 * tokens = {2 * self.count} exceeds the length {self.seq}")

    def sample(self, batch, gen, split):
        count, region = self.count, self.seq - self.count
        data = torch.randint(1, self.alphabet - 1, (batch, count), generator=gen)
        slots = torch.rand(batch, region, generator=gen).argsort(1)[:, :count].sort(1).values
        inputs = torch.zeros(batch, self.seq, dtype=torch.long)
        inputs.scatter_(1, slots, data)
        inputs[:, region:] = self.alphabet - 1
        targets = torch.full((batch, self.seq), IGNORE, dtype=torch.long)
        targets[:, region:] = data
        return Batch(inputs=inputs, targets=targets)


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[torch.Tensor, int]:
    """The standard library's pydoc topics as byte ids (ASCII kept, every other byte one shared id)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    data = torch.where(data < 128, data, torch.full_like(data, 127))
    return data, 128


@register_task("char_lm")
class CharLM(Task):
    """Character-level language modelling on Python's own documentation (pydoc topics), in bits per character on
    held-out text (the last ``eval_fraction`` of the corpus)."""

    pattern = "causal_self"
    metric = "bpc"
    higher_is_better = False
    defaults = {**Task.defaults, "seq_lens": [128], "eval_fraction": 0.1, "steps": 600, "lr": 3e-3,
                "batch": 32, "d_model": 128, "heads": 4}

    def setup(self):
        data, self.vocab = corpus()
        self.classes = self.vocab
        fraction = self.float_param("eval_fraction", 0.01, 0.5)
        cut = int(len(data) * (1 - fraction))
        self.splits = {"train": data[:cut], "eval": data[cut:]}
        if self.seq + 1 > len(self.splits["eval"]):
            raise self.error("seq_lens", f"{self.seq} exceeds the held-out text ({len(self.splits['eval'])} chars)")

    def sample(self, batch, gen, split):
        data = self.splits[split]
        starts = torch.randint(0, len(data) - self.seq - 1, (batch,), generator=gen)
        windows = data[starts[:, None] + torch.arange(self.seq + 1)[None, :]]
        return Batch(inputs=windows[:, :-1], targets=windows[:, 1:])
