"""Packed sequences: documents (full or causal inside each), per-document prefix-LM, block-causal documents
(video-style frames), and the shared-question mask. All are self-attention masks (``seq_q == seq_kv``).

Document lengths are given (``lengths``, summing to the sequence) or drawn, deterministically from ``seed``:
``num_docs`` documents (or ``ceil(seq / mean_length)`` when ``num_docs`` is 0) with lengths proportional to
weights from ``distribution`` — ``equal``, ``uniform`` (U(0, 1)), ``lognormal`` (shape ``sigma``; real corpora
are close to sigma 1-1.5) or ``pareto`` (tail index ``alpha``, heavier for smaller alpha) — each at least 1
token and at most ``max_share`` of the sequence, so packing never degenerates into one document.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import MaskParamError, MaskSpec, VarlenForm, check_at_least, check_choice, check_fraction
from .families import IntervalMask
from .registry import register_mask

DISTRIBUTIONS = ("equal", "uniform", "lognormal", "pareto")


def draw_weights(num_docs: int, distribution: str, sigma: float, alpha: float, seed: int) -> torch.Tensor:
    """Positive float64 weights, one per document, from ``distribution`` seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    if distribution == "equal":
        return torch.ones(num_docs, dtype=torch.float64)
    uniform = torch.rand(num_docs, generator=generator, dtype=torch.float64)
    if distribution == "uniform":
        return uniform + 1e-12
    if distribution == "lognormal":
        return torch.exp(sigma * torch.randn(num_docs, generator=generator, dtype=torch.float64))
    return (1.0 - uniform) ** (-1.0 / alpha)  # pareto, x_m = 1


def split_by_weights(total: int, weights: torch.Tensor, cap: int) -> torch.Tensor:
    """Integer lengths >= 1 and <= ``cap`` summing to ``total``, proportional to ``weights`` where the cap allows
    (water-filling, then largest remainders). Needs ``len(weights) <= total <= len(weights) * cap``."""
    num_docs = len(weights)
    spare, spare_cap = float(total - num_docs), cap - 1  # one token per document is reserved
    shares = torch.zeros(num_docs, dtype=torch.float64)
    free = torch.ones(num_docs, dtype=torch.bool)
    remaining = spare
    while free.any():
        free_weights = torch.where(free, weights, torch.zeros_like(weights))
        proposal = remaining * free_weights / free_weights.sum()
        over = free & (proposal > spare_cap)
        if not over.any():
            shares = torch.where(free, proposal, shares)
            break
        shares[over] = spare_cap
        free &= ~over
        remaining -= spare_cap * int(over.sum())
    whole = shares.floor()
    missing = int(round(spare - float(whole.sum())))
    bump = torch.zeros(num_docs, dtype=torch.float64)
    bump[torch.argsort(shares - whole, descending=True, stable=True)[:missing]] = 1.0
    return 1 + (whole + bump).to(torch.int64)


@dataclass(frozen=True)
class Packing(MaskSpec):
    """Parameters shared by the document masks: how a sequence is split into documents."""

    lengths: tuple[int, ...] = ()
    num_docs: int = 0
    mean_length: int = 1024
    distribution: str = "lognormal"
    sigma: float = 1.0
    alpha: float = 1.5
    max_share: float = 0.5
    seed: int = 0
    supports_cross = False

    def _validate(self) -> None:
        for length in self.lengths:
            if length < 1:
                raise MaskParamError(self.name, "lengths", f"every document length must be >= 1, got {length}")
        if self.lengths and self.num_docs:
            raise MaskParamError(self.name, "num_docs", "give either lengths or num_docs, not both")
        check_at_least(self, "num_docs", 0)
        check_at_least(self, "mean_length", 1)
        check_choice(self, "distribution", DISTRIBUTIONS)
        for field in ("sigma", "alpha"):
            if getattr(self, field) <= 0:
                raise MaskParamError(self.name, field, f"must be > 0, got {getattr(self, field)}")
        check_fraction(self, "max_share", allow_zero=False)

    def _validate_lengths(self, seq_q: int, seq_kv: int) -> None:
        if self.lengths:
            if sum(self.lengths) != seq_q:
                raise MaskParamError(
                    self.name, "lengths", f"document lengths sum to {sum(self.lengths)}, but the sequence has "
                    f"{seq_q} tokens"
                )
            return
        num_docs, cap = self.document_count(seq_q), self.length_cap(seq_q)
        if num_docs > seq_q:
            raise MaskParamError(self.name, "num_docs", f"{num_docs} documents cannot fit in {seq_q} tokens")
        if num_docs * cap < seq_q:
            raise MaskParamError(
                self.name, "max_share", f"{num_docs} documents of at most {cap} tokens (max_share={self.max_share})"
                f" cannot fill {seq_q} tokens; raise num_docs or max_share"
            )

    def document_count(self, seq: int) -> int:
        """Documents drawn for ``seq`` tokens: ``num_docs``, or ``ceil(seq / mean_length)`` raised where needed
        so that documents of at most ``max_share`` of the sequence fill it."""
        if self.num_docs:
            return self.num_docs
        return max(math.ceil(seq / self.mean_length), math.ceil(seq / self.length_cap(seq)))

    def length_cap(self, seq: int) -> int:
        return max(1, math.floor(self.max_share * seq))

    def document_lengths(self, seq: int) -> torch.Tensor:
        """int64 lengths of the documents packed into ``seq`` tokens, in order (deterministic)."""
        if self.lengths:
            return torch.tensor(self.lengths, dtype=torch.int64)
        num_docs = self.document_count(seq)
        weights = draw_weights(num_docs, self.distribution, self.sigma, self.alpha, self.seed)
        return split_by_weights(seq, weights, self.length_cap(seq))


class BoundDocuments(IntervalMask):
    """Tokens grouped into consecutive segments: ``cu_seqlens`` (int64 [n + 1]) and per-token ``segment_ids``
    (int32 [S])."""

    def __init__(self, spec, seq_q, seq_kv, segment_lengths: torch.Tensor):
        super().__init__(spec, seq_q, seq_kv)
        self.cu_seqlens = torch.nn.functional.pad(segment_lengths.cumsum(0), (1, 0))
        self.segment_ids = torch.repeat_interleave(
            torch.arange(len(segment_lengths), dtype=torch.int32), segment_lengths
        )

    def segment_bounds(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, end) of the segment holding each token of ``q``."""
        segment = self.segment_ids[q].to(torch.int64)
        return self.cu_seqlens[segment], self.cu_seqlens[segment + 1]

    def segment_lengths(self) -> torch.Tensor:
        return self.cu_seqlens.diff()

    def same_segment(self, q_idx, kv_idx):
        return self.segment_ids[q_idx] == self.segment_ids[kv_idx]

    def segments_varlen(self, causal: bool) -> VarlenForm:
        cu_seqlens = self.cu_seqlens.to(torch.int32).cpu()
        longest = int(self.segment_lengths().max())
        return VarlenForm(cu_seqlens, cu_seqlens, longest, longest, causal=causal)


class BoundDocument(BoundDocuments):
    def __init__(self, spec, seq_q, seq_kv):
        super().__init__(spec, seq_q, seq_kv, spec.document_lengths(seq_q))

    def mask_mod(self, b, h, q_idx, kv_idx):
        same = self.same_segment(q_idx, kv_idx)
        return same & (kv_idx <= q_idx) if self.spec.causal else same

    def row_intervals(self, q):
        start, end = self.segment_bounds(q)
        return ((start, q + 1 if self.spec.causal else end),)

    def visible_pairs(self) -> int:
        lengths = self.segment_lengths()
        per_document = lengths * (lengths + 1) // 2 if self.spec.causal else lengths * lengths
        return int(per_document.sum())

    def varlen(self) -> VarlenForm:
        return self.segments_varlen(self.spec.causal)


@register_mask
@dataclass(frozen=True)
class Document(Packing):
    """Packed documents: a token sees the tokens of its own document only, all of them or (``causal``) those
    up to itself."""

    name = "document"
    description = "packed documents (varlen): attention inside each document, full or causal"
    bound_cls = BoundDocument
    causal: bool = False


class BoundDocumentPrefixLM(BoundDocuments):
    def __init__(self, spec, seq_q, seq_kv):
        lengths = spec.document_lengths(seq_q)
        super().__init__(spec, seq_q, seq_kv, lengths)
        if spec.prefix_lengths:
            prefixes = torch.tensor(spec.prefix_lengths, dtype=torch.int64)
        else:
            prefixes = torch.floor(lengths * spec.prefix_fraction).to(torch.int64)
        self.prefix_ends = self.cu_seqlens[:-1] + prefixes  # [n]

    def mask_mod(self, b, h, q_idx, kv_idx):
        prefix_end = self.prefix_ends[self.segment_ids[q_idx]]
        return self.same_segment(q_idx, kv_idx) & ((kv_idx <= q_idx) | (kv_idx < prefix_end))

    def row_intervals(self, q):
        start, _ = self.segment_bounds(q)
        prefix_end = self.prefix_ends[self.segment_ids[q].to(torch.int64)]
        return ((start, torch.maximum(prefix_end, q + 1)),)


@register_mask
@dataclass(frozen=True)
class DocumentPrefixLM(Packing):
    """Prefix-LM inside each packed document: the document's first tokens (its prompt) are bidirectional,
    the rest causal. Prefixes are ``prefix_lengths`` (one per document, with explicit ``lengths``) or
    ``floor(prefix_fraction * length)``."""

    name = "document_prefix_lm"
    causal = False
    description = "packed documents, each a prefix-LM: bidirectional prompt, causal after it"
    bound_cls = BoundDocumentPrefixLM
    prefix_fraction: float = 0.5
    prefix_lengths: tuple[int, ...] = ()

    def _validate(self) -> None:
        super()._validate()
        check_fraction(self, "prefix_fraction", allow_zero=True)
        if not self.prefix_lengths:
            return
        if len(self.prefix_lengths) != len(self.lengths):
            raise MaskParamError(
                self.name, "prefix_lengths", f"needs one prefix per document of `lengths` ({len(self.lengths)}),"
                f" got {len(self.prefix_lengths)}"
            )
        for prefix, length in zip(self.prefix_lengths, self.lengths):
            if not 0 <= prefix <= length:
                raise MaskParamError(self.name, "prefix_lengths", f"prefix {prefix} is outside [0, {length}]")


class BoundBlockCausalDocument(BoundDocuments):
    def __init__(self, spec, seq_q, seq_kv):
        super().__init__(spec, seq_q, seq_kv, spec.document_lengths(seq_q))

    def mask_mod(self, b, h, q_idx, kv_idx):
        starts = self.cu_seqlens
        q_frame = (q_idx - starts[self.segment_ids[q_idx]]) // self.spec.frame
        kv_frame = (kv_idx - starts[self.segment_ids[kv_idx]]) // self.spec.frame
        return self.same_segment(q_idx, kv_idx) & (kv_frame <= q_frame)

    def row_intervals(self, q):
        start, end = self.segment_bounds(q)
        frame = self.spec.frame
        frame_end = start + (torch.div(q - start, frame, rounding_mode="floor") + 1) * frame
        return ((start, torch.minimum(frame_end, end)),)


@register_mask
@dataclass(frozen=True)
class BlockCausalDocument(Packing):
    """Packed documents (videos) of frames of ``frame`` tokens: a token sees every token of its own and earlier
    frames of its document. Frames start at each document's first token."""

    name = "block_causal_document"
    causal = False
    description = "packed documents of `frame`-token frames: block-causal inside each document (video)"
    bound_cls = BoundBlockCausalDocument
    frame: int = 256

    def _validate(self) -> None:
        super()._validate()
        check_at_least(self, "frame", 1)


class BoundSharedQuestion(BoundDocuments):
    def __init__(self, spec, seq_q, seq_kv):
        super().__init__(spec, seq_q, seq_kv, spec.segment_lengths(seq_q))

    def mask_mod(self, b, h, q_idx, kv_idx):
        own_answer = kv_idx >= self.cu_seqlens[self.segment_ids[q_idx]]
        return (kv_idx <= q_idx) & ((kv_idx < self.spec.question) | own_answer)

    def row_intervals(self, q):
        start, _ = self.segment_bounds(q)
        return ((torch.zeros_like(q), (q + 1).clamp(max=self.spec.question)), (start, q + 1))


@register_mask
@dataclass(frozen=True)
class SharedQuestion(MaskSpec):
    """One question followed by several answers packed together (reward models, GRPO): the question is causal;
    each answer sees the whole question and itself causally, never another answer. Answers are
    ``answer_lengths`` or ``num_answers`` near-equal parts of the rest."""

    name = "shared_question"
    causal = True
    supports_cross = False
    description = "question then answers: each answer sees the question and itself (causal), not other answers"
    bound_cls = BoundSharedQuestion
    question: int = 256
    num_answers: int = 4
    answer_lengths: tuple[int, ...] = ()

    def _validate(self) -> None:
        check_at_least(self, "question", 1)
        check_at_least(self, "num_answers", 1)
        for length in self.answer_lengths:
            if length < 1:
                raise MaskParamError(self.name, "answer_lengths", f"every answer length must be >= 1, got {length}")

    def _validate_lengths(self, seq_q: int, seq_kv: int) -> None:
        if self.answer_lengths:
            if self.question + sum(self.answer_lengths) != seq_q:
                raise MaskParamError(
                    self.name, "answer_lengths", f"question ({self.question}) + answers "
                    f"({sum(self.answer_lengths)}) must equal the sequence, {seq_q} tokens"
                )
        elif seq_q - self.question < self.num_answers:
            raise MaskParamError(
                self.name, "question", f"a question of {self.question} tokens leaves {seq_q - self.question} for "
                f"{self.num_answers} answers in {seq_q} tokens; must be <= {seq_q - self.num_answers}"
            )

    def segment_lengths(self, seq: int) -> torch.Tensor:
        """Question then answers: int64 lengths summing to ``seq``."""
        if self.answer_lengths:
            answers = list(self.answer_lengths)
        else:
            base, extra = divmod(seq - self.question, self.num_answers)
            answers = [base + (i < extra) for i in range(self.num_answers)]
        return torch.tensor([self.question, *answers], dtype=torch.int64)
