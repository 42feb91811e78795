"""Noncausal self tasks (encoders, one class per sequence read at position 0): LRA ListOps from its generator's
recipe (§16.5), and the handwritten digits that ship with scikit-learn, upsampled, as a 2-D layout (§16.8)."""
from __future__ import annotations

import functools
import random

import torch

from .registry import Batch, Task, register_task

# ListOps vocabulary: PAD, CLS, digits 0-9, the four operators, and the closing bracket
PAD, CLS = 0, 1
DIGIT0 = 2
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
OP0 = DIGIT0 + 10
CLOSE = OP0 + len(OPERATORS)
LISTOPS_VOCAB = CLOSE + 1


class _TooLong(Exception):
    pass


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, operator_p: float, budget: list):
    """LRA's recursive tree: below ``max_depth`` an operator node with probability ``operator_p`` (LRA's
    VALUE_P = 0.25: a leaf when r > 0.25) and 2..``max_args`` children, else (and always at ``max_depth``) a digit.
    ``budget[0]``: tokens left; a tree that outgrows it is abandoned at once (it would be rejected anyway)."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLong
    if depth >= max_depth or rng.random() >= operator_p:
        return rng.randrange(10)
    budget[0] -= 1  # the closing bracket
    op = rng.randrange(len(OPERATORS))
    return (op, [_tree(rng, depth + 1, max_depth, max_args, operator_p, budget)
                 for _ in range(rng.randint(2, max_args))])


def _value(node) -> int:
    if isinstance(node, int):
        return node
    op, children = node
    values = [_value(c) for c in children]
    if op == 0:
        return min(values)
    if op == 1:
        return max(values)
    if op == 2:
        ordered = sorted(values)
        middle = len(ordered) // 2
        # int(np.median): the mean of the two middle values, truncated, for an even count
        return ordered[middle] if len(ordered) % 2 else int((ordered[middle - 1] + ordered[middle]) / 2)
    return sum(values) % 10


def _tokens(node, out: list) -> list:
    if isinstance(node, int):
        out.append(DIGIT0 + node)
    else:
        op, children = node
        out.append(OP0 + op)
        for child in children:
            _tokens(child, out)
        out.append(CLOSE)
    return out


@register_task("listops")
class ListOps(Task):
    """LRA ListOps: nested MIN/MAX/MED/SM (sum mod 10) expressions over digits; the class is the value.

    Trees as in LRA's generator (an operator with probability ``operator_p`` = 0.25 below ``max_depth``, with
    2..``max_args`` arguments, else a digit); kept when their token count lies in [``min_len``, length - 1] (LRA: 500..2000 at
    2,048). ``train_pool``: 0 draws fresh trees for every batch; N > 0 draws a fixed training set of N trees
    once (as LRA's 96,000) and samples batches from it. The sequence is [CLS] + tokens (brackets dropped, as LRA's tokenizer does) + padding.
    """

    pattern = "noncausal_self"
    metric = "accuracy"
    readout = "cls"
    pad_id = PAD
    defaults = {**Task.defaults, "seq_lens": [128], "max_depth": 10, "max_args": 10, "operator_p": 0.25,
                "min_len_fraction": 0.25, "train_pool": 0, "steps": 600, "lr": 1e-3, "batch": 32, "d_model": 64, "heads": 4}

    def setup(self):
        self.vocab, self.classes = LISTOPS_VOCAB, 10
        self.max_depth = self.int_param("max_depth")
        self.max_args = self.int_param("max_args", 2)
        self.operator_p = self.float_param("operator_p", 0.0, 1.0)
        fraction = self.float_param("min_len_fraction", 0.0, 1.0)
        self.min_len = max(1, int(fraction * (self.seq - 1)))
        if self.seq < 8:
            raise self.error("seq_lens", f"must be at least 8, got {self.seq}")

    def _example(self, rng: random.Random) -> tuple[list, int]:
        for _ in range(100_000):
            try:
                tree = _tree(rng, 1, self.max_depth, self.max_args, self.operator_p, [self.seq - 1])
            except _TooLong:
                continue
            if isinstance(tree, int):
                continue
            tokens = _tokens(tree, [])
            if self.min_len <= len(tokens) <= self.seq - 1:
                return tokens, _value(tree)
        raise self.error("min_len_fraction", f"no tree of {self.min_len}..{self.seq - 1} tokens in 100,000 draws; "
                                             "lower it or change max_depth/max_args")

    def _examples(self, count: int, rng: random.Random) -> Batch:
        inputs = torch.full((count, self.seq), PAD, dtype=torch.long)
        inputs[:, 0] = CLS
        targets = torch.empty(count, dtype=torch.long)
        for row in range(count):
            tokens, value = self._example(rng)
            inputs[row, 1:1 + len(tokens)] = torch.tensor(tokens)
            targets[row] = value
        return Batch(inputs=inputs, targets=targets)

    def sample(self, batch, gen, split):
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=gen)))
        pool = int(self.params["train_pool"])
        if split != "train" or pool == 0:
            return self._examples(batch, rng)
        if getattr(self, "_pool", None) is None:  # a fixed training set, as LRA's (drawn from the train stream)
            self._pool = self._examples(pool, rng)
        index = torch.randint(0, pool, (batch,), generator=gen)
        return Batch(inputs=self._pool.inputs[index], targets=self._pool.targets[index])


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digit images (values 0..16) and labels, in a fixed shuffled order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images[order], labels[order]


@register_task("digits")
class Digits(Task):
    """scikit-learn's handwritten digits upsampled to a side of sqrt(length) pixels (bilinear), each pixel a token
    of ``levels`` grey levels with a learned position; the class is read at position 0, whose pixel (the top-left
    corner, blank in these images) is replaced by a class token. ``BuildContext.options["grid"]`` holds the
    (height, width) for methods with a 2-D layout. Held out: the last ``eval_fraction`` of the images."""

    pattern = "noncausal_self"
    metric = "accuracy"
    readout = "cls"
    requires = ("sklearn",)
    defaults = {**Task.defaults, "seq_lens": [256], "levels": 16, "eval_fraction": 0.15, "steps": 400, "lr": 2e-3,
                "batch": 32, "d_model": 64, "heads": 4}

    def setup(self):
        side = int(round(self.seq ** 0.5))
        if side * side != self.seq or side % 8:
            raise self.error("seq_lens", f"must be a square of a multiple of 8 (64, 256, 1024, 4096, ...), got {self.seq}")
        self.levels = self.int_param("levels", 2)
        self.side = side
        self.grid = (side, side)
        self.vocab, self.classes = self.levels + 1, 10  # grey levels, then the class token
        images, labels = digits()
        cut = int(len(labels) * (1 - self.float_param("eval_fraction", 0.05, 0.5)))
        self.splits = {"train": (images[:cut], labels[:cut]), "eval": (images[cut:], labels[cut:])}
        self.eval_cursor = 0

    def sample(self, batch, gen, split):
        images, labels = self.splits[split]
        index = torch.randint(0, len(labels), (batch,), generator=gen)
        picked = images[index][:, None] / 16.0
        if self.side != 8:
            picked = torch.nn.functional.interpolate(picked, size=(self.side, self.side), mode="bilinear",
                                                     align_corners=False)
        tokens = (picked[:, 0].clamp(0, 1) * (self.levels - 1)).round().long().reshape(batch, -1)
        tokens[:, 0] = self.levels  # the class token
        return Batch(inputs=tokens, targets=labels[index])
