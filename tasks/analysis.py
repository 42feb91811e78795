"""The experiments of the analysis papers (methods-spec-3), as tasks of kind ``experiment``: each builds, trains or
fits its own small model around the attention method and reports its checks (``extras["checks"]``: name ->
passed, with the measured numbers beside them). Written from the spec; no code from the papers' repositories.

``icl_linreg_1layer_mh`` (§8, He et al., arXiv:2503.12734): one layer of H-head attention on in-context linear
regression, merged parametrisation ``W_KQ^h, W_OV^h ∈ R^{(d+1)×(d+1)}``: tokens ``z_ℓ = (x_ℓ, y_ℓ)``, the query
``z_q = (x_q, 0)`` last; the method runs causal self-attention over the L + 1 tokens (so the query also attends
to itself: unverified in the paper) with ``q = W_KQ z`` (× √head_dim, cancelling the kernel's scale),
``k = z``, ``v = W_OV z`` (zero-padded to ``head_dim``), and ``ŷ = Σ_h out_h[d]`` at the query. Trained with
Adam on MSE from a small initialisation. Measured: MSE at L (the value) and at ``test_factors`` × L (the
method built again for each length, its learnable tensors, if any, set to the trained ones). A method's
extra inputs are handled as in the task models (``model.ExtraProjection``): one per token (gates, β, slot scores,
a second key set) becomes a learned map of the token z, trained with the model (the single-head one has its own)
and reused at every length; a fixed-size one is drawn per call; one whose shape changes with the length otherwise
makes the method ``unsupported`` (the method is built at two lengths to tell them apart); a prepare step runs per
call, as in the harness. The mechanism — per active head (|μ_h| ≥ 10 % of the largest) the x-block off-diagonal / diagonal ratio
(``kq_offdiag_ratio < 0.05``), the OV last row besides μ over |μ| (``ov_last_entry_ratio < 0.05``),
``|Σμ|/Σ|μ| < 0.05``; the closed-form predictor ``Σ_h μ_h softmax(ω_h x·x_q) y`` (ω_h the mean diagonal,
μ_h the (d+1, d+1) entry, same attended set) reproducing the model (R² > 0.99); a single-head model of the
same method (MSE above the H-head one); an H-head linear-attention baseline (no normaliser: the sum scaled by
the training length, our reading) whose MSE grows more from L to 4L than the method's. Baseline: ridge (the
posterior mean under the β prior). Defaults are ours (the paper's settings are unverified).

``mqar_state_sweep`` (§11, the DSF protocol): MQAR accuracy against the per-head Q/K width ``n`` (``qk_dims``) at
fixed ``d_model``, one standard MQAR training per n (the host model's ``qk_dim``); the value is the accuracy at
the largest n, the breakdown per n, ``extras`` the state per layer (``heads·n·d_v`` for a linear-attention
state; softmax's KV cache ``heads·seq·(n + d_v)``). Check: the method sees Q/K of width n (the kernel is built
with ``head_dim = n``).

``rf_attention_probe`` (§7, Fu et al., arXiv:2307.11353): one attention layer with M heads whose query-key
matrices are random and frozen, ``W_m ~ N(c·I/d, I/d²)`` (``bias_mean`` c; c = 0 is RFA, c > 0 biased RFA), and
trained values: the features are the method's outputs ``Σ_i a_{m,i} x_i`` (``q = W_mᵀ x₀``, ``k = v = x_i``,
noncausal cross, one query over N keys), the values are fitted by ridge in closed form (λ on a validation
split). Nothing is trained around the method, so a method with a per-token extra (in a trained model a
learned map of the input) is ``unsupported`` here, saying so; a prepare step runs per call, fixed-size extras are
drawn once. Baseline RFMLP: ReLU random features of ``[x₀; x₁; …; x_N]`` with the same count M·d. Targets on
``x ∈ √d·S^{d−1}``: ``quadratic`` (1/N)Σ⟨β,x_i⟩⟨x₀,x_i⟩/√d, ``cubic`` (1/N)Σ(⟨x₀,x_i⟩/√d)³ (both invariant
to permuting the keys), ``control`` ⟨β, x₁⟩ (not invariant). Metric: test MSE / Var(target). Checks: the
model's output is invariant to permuting the keys; (tracked) RFA below RFMLP on the invariant targets.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn

from .model import (build_method, call_method, draw_extras, extra_projections, task_case, token_extras,
                    untrained_extras)
from .registry import Task, register_task
from .train import Outcome, stream_seed


def _call(prepared, caps, q, k, v, extras=None):
    return call_method(prepared, caps.input_layout, q, k, v, extras or {})


def _case(task, method, batch, heads, seq_q, seq_kv, head_dim, dtype, seed, device, mode="fwd_bwd"):
    return task_case(method=method, mask=task.mask_name, mask_name=task.mask_name, batch=batch, heads_q=heads,
                         heads_kv=heads, seq_q=seq_q, seq_kv=seq_kv, head_dim=head_dim, dtype=dtype, mode=mode,
                         seed=seed, device=device)


def per_token_extras(task_name: str, method: str, first: tuple, second: tuple, layout: str) -> list[str]:
    """The extras of a method built at two lengths (``(tokens, prepared)`` each) that are one entry per token: the
    learned maps of the layer input (``model.token_extras`` whose shape changes with the length along the token
    axis alone). Every other extra must keep its shape (drawn per call); an extra that changes otherwise is neither
    per token nor fixed and raises ``Unsupported`` naming it."""
    from attnbench.methods import Unsupported

    (t1, p1), (t2, p2) = first, second
    axis = 2 if layout == "bhsd" else 1
    learned = []
    for name in sorted(set(p1.extras) | set(p2.extras)):
        if name not in p1.extras or name not in p2.extras:
            at = t1 if name in p1.extras else t2
            raise Unsupported(f"{task_name}: {method} declares the extra {name!r} at {at} tokens only (built for "
                              f"{t1} and {t2}), so no map of the input serves every length")
        a, b = p1.extras[name].shape, p2.extras[name].shape
        changed = [i for i in range(len(a)) if a[i] != b[i]] if len(a) == len(b) else None
        if changed == [axis] and (a[axis], b[axis]) == (t1, t2):
            if name in token_extras(p1, t1, layout):
                learned.append(name)
        elif changed != []:
            raise Unsupported(f"{task_name}: {method}'s extra {name!r} has shape {tuple(a)} at {t1} tokens and "
                              f"{tuple(b)} at {t2}: neither one entry per token (axis {axis}) nor a fixed size, so "
                              "it cannot be a learned map of each token's input")
    return learned


# ---- icl_linreg_1layer_mh ---------------------------------------------------------------------------------------
def icl_batch(batch: int, length: int, d: int, noise: float, gen: torch.Generator):
    """(Z [B, L+1, d+1] with the query last and its y zeroed, targets [B], X, y, x_q)."""
    x = torch.randn(batch, length + 1, d, generator=gen)
    beta = torch.randn(batch, d, generator=gen) / math.sqrt(d)
    y = (x @ beta[..., None])[..., 0] + math.sqrt(noise) * torch.randn(batch, length + 1, generator=gen)
    z = torch.cat([x, y[..., None]], dim=-1)
    z[:, -1, d] = 0.0
    return z, y[:, -1], x, y


class ICLModel(nn.Module):
    """One layer of H-head attention in the merged (W_KQ, W_OV) parametrisation, the core a method's fn."""

    def __init__(self, heads: int, d: int, head_dim: int, init_std: float, kind: str = "method", fn_for=None,
                 train_length: int = 1):
        """``fn_for(tokens)``: the method's ``fn(q, k, v, **learned_extras)`` built for sequences of ``tokens`` tokens
        (a built method is valid only for the case it was built for: evaluating at 4 L needs a build for 4 L + 1
        tokens). ``extra_maps``: the method's per-token extras as learned maps of the tokens z
        (``model.ExtraProjection``, d + 1 wide), trained with W_KQ and W_OV and used at every length."""
        super().__init__()
        self.d, self.head_dim, self.kind, self.fn_for, self.train_length = d, head_dim, kind, fn_for, train_length
        self.w_kq = nn.Parameter(torch.randn(heads, d + 1, d + 1) * init_std)
        self.w_ov = nn.Parameter(torch.randn(heads, d + 1, d + 1) * init_std)
        self.extra_maps = nn.ModuleDict()

    def qkv(self, z):
        heads = self.w_kq.shape[0]
        pad = self.head_dim - (self.d + 1)

        def widen(t):
            return torch.nn.functional.pad(t, (0, pad))

        q = widen(torch.einsum("hij,btj->bhti", self.w_kq, z)) * math.sqrt(self.head_dim)
        k = widen(z[:, None].expand(-1, heads, -1, -1))
        v = widen(torch.einsum("hij,btj->bhti", self.w_ov, z))
        return q, k, v

    def forward(self, z, dtype=torch.float32):
        if self.kind == "linear":  # no normaliser: Σ_ℓ (z_ℓᵀ W_KQ z_q)(W_OV z_ℓ)_d over the context / L_train
            logits = torch.einsum("btj,hij,bi->bht", z[:, :-1], self.w_kq, z[:, -1])
            values = torch.einsum("hj,btj->bht", self.w_ov[:, self.d], z[:, :-1])
            return (logits * values).sum((1, 2)) / self.train_length
        q, k, v = (t.to(dtype) for t in self.qkv(z))
        learned = {name: projection(z, dtype) for name, projection in self.extra_maps.items()}
        out = self.fn_for(z.shape[1])(q, k, v, **learned)
        return out[:, :, -1, self.d].float().sum(1)


def mechanism(model: ICLModel, z: torch.Tensor, y_model: torch.Tensor) -> dict:
    """The spec's mechanism checks on a trained model (numbers and pass/fail)."""
    d = model.d
    kq, ov = model.w_kq.detach().float(), model.w_ov.detach().float()
    mu = ov[:, d, d]
    active = mu.abs() >= 0.1 * mu.abs().max().clamp_min(1e-12)
    block = kq[:, :d, :d]
    diag = torch.diagonal(block, dim1=-2, dim2=-1)
    offdiag = block - torch.diag_embed(diag)
    kq_ratio = (offdiag.flatten(1).norm(dim=1) / diag.norm(dim=1).clamp_min(1e-12))[active].max()
    ov_ratio = (ov[:, d, :d].norm(dim=1) / mu.abs().clamp_min(1e-12))[active].max()
    zero_sum = mu.sum().abs() / mu.abs().sum().clamp_min(1e-12)
    omega = diag.mean(1)
    # the closed form: Σ_h μ_h Σ_ℓ y_ℓ softmax_ℓ(ω_h x_ℓ·x_q) over the same attended set (context and query)
    x, xq, yy = z[:, :, :d], z[:, -1, :d], z[:, :, d]
    logits = omega[None, :, None] * torch.einsum("btd,bd->bt", x, xq)[:, None, :]
    closed = (mu[None, :] * (torch.softmax(logits, dim=-1) * yy[:, None, :]).sum(-1)).sum(1)
    resid = ((y_model - closed) ** 2).sum()
    total = ((y_model - y_model.mean()) ** 2).sum().clamp_min(1e-12)
    r2 = float(1 - resid / total)
    numbers = {"kq_offdiag_ratio": float(kq_ratio), "ov_last_entry_ratio": float(ov_ratio),
               "zero_sum_ratio": float(zero_sum), "closed_form_r2": r2, "omega": omega.tolist(), "mu": mu.tolist()}
    checks = {"kq_offdiag_ratio<0.05": numbers["kq_offdiag_ratio"] < 0.05,
              "ov_last_entry_ratio<0.05": numbers["ov_last_entry_ratio"] < 0.05,
              "zero_sum_ratio<0.05": numbers["zero_sum_ratio"] < 0.05,
              "closed_form_r2>0.99": r2 > 0.99}
    return {"numbers": numbers, "checks": checks}


def ridge_mse(x, y, xq, yq, noise: float) -> float:
    """The posterior-mean predictor under β ~ N(0, I/d): (XᵀX + σ²d I)⁻¹ Xᵀy."""
    d = x.shape[-1]
    gram = x.transpose(1, 2) @ x + noise * d * torch.eye(d)
    beta = torch.linalg.solve(gram, (x.transpose(1, 2) @ y[..., None]))[..., 0]
    return float((((xq * beta).sum(-1)) - yq).pow(2).mean())


@register_task("icl_linreg_1layer_mh")
class ICLLinReg(Task):
    """In-context linear regression with one layer of multi-head attention; the learned mechanism checked."""

    kind = "experiment"
    pattern = "causal_self"
    metric = "mse"
    higher_is_better = False
    defaults = {"seq_lens": [32], "d": 8, "heads": 4, "head_dim": 16, "noise": 0.1, "steps": 2000, "batch": 256,
                "lr": 3e-3, "init_std": 1e-3, "test_factors": [1, 4], "eval_batches": 8, "baselines": True}

    def setup(self):
        self.d = self.int_param("d")
        self.heads = self.int_param("heads")
        self.head_dim = self.int_param("head_dim", 2)
        if self.head_dim < self.d + 1:
            raise self.error("head_dim", f"must hold a token (d + 1 = {self.d + 1}), got {self.head_dim}")
        self.noise = self.float_param("noise", 0.0, 100.0)
        self.int_param("steps")
        self.int_param("batch")
        self.float_param("lr", 1e-8, 10.0)
        self.float_param("init_std", 0.0, 10.0)
        factors = self.params["test_factors"]
        if not factors or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in factors):
            raise self.error("test_factors", f"must be positive integers, got {factors!r}")
        self.seq_q = self.seq_kv = self.seq + 1
        self.params["d_model"] = self.heads * self.head_dim  # what the planner's attention case reads

    def _train(self, model, steps, batch, gen, device, dtype, deadline):
        opt = torch.optim.Adam(list(model.parameters()) + list(model.extra), lr=float(self.params["lr"]))
        losses = []
        for step in range(steps):
            z, target, _, _ = icl_batch(batch, self.seq, self.d, self.noise, gen)
            z, target = z.to(device), target.to(device)
            loss = (model(z, dtype) - target).pow(2).mean()
            value = float(loss.detach())
            if not math.isfinite(value):
                return losses, f"training loss became {value} at step {step}"
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(value)
            if deadline is not None and time.perf_counter() > deadline:
                return losses, f"passed its time budget after {step + 1} of {steps} steps"
        return losses, None

    def _mse(self, model, length, seed, device, dtype):
        gen = torch.Generator().manual_seed(stream_seed(self.name, length, seed, "eval"))
        errs = []
        with torch.no_grad():
            for _ in range(int(self.params["eval_batches"])):
                z, target, _, _ = icl_batch(int(self.params["batch"]), length, self.d, self.noise, gen)
                errs.append(float((model(z.to(device), dtype) - target.to(device)).pow(2).mean()))
        return sum(errs) / len(errs)

    def _model(self, method, heads, seed, dtype, device, options, method_params, kind="method"):
        """The ICL model. For ``kind="method"``, the method is built for the L + 1 training tokens and, eagerly, for
        a second length (the longest evaluation length, else 2 L + 1) to tell its extras apart
        (:func:`per_token_extras`): per-token ones become learned maps of z (``model.ExtraProjection``, trained
        with the model and reused at every length), fixed-size ones are drawn per call (``model.draw_extras``), and
        its prepare step runs per call (``model.call_method``), as in the task models."""
        from attnbench.methods import Unsupported

        fn_for, extra, learned = None, [], []
        if kind == "method":
            built = {}
            calls = [0]

            def build(tokens):
                case = _case(self, method, int(self.params["batch"]), heads, tokens, tokens, self.head_dim, dtype,
                             seed, device)
                prepared, caps = build_method(case, torch.device(device), dict(options or {}), method_params or {})
                return prepared, caps, [p for p in prepared.parameters
                                        if isinstance(p, torch.Tensor) and p.requires_grad]

            train_tokens = self.seq + 1
            built[train_tokens] = build(train_tokens)
            extra = built[train_tokens][2]
            prepared, caps = built[train_tokens][:2]
            if prepared.extras:
                longest = max(self.params["test_factors"]) * self.seq + 1
                other = longest if longest != train_tokens else 2 * self.seq + 1
                built[other] = build(other)
                learned = per_token_extras(self.name, method, (train_tokens, prepared), (other, built[other][0]),
                                           caps.input_layout)

            def fn_for(tokens):
                """The method built for ``tokens`` (once per length), its learnable tensors set to the trained ones;
                the learned extras come from the model (its ``extra_maps``), the others are drawn here."""
                if tokens not in built:
                    built[tokens] = build(tokens)
                prepared, caps, own = built[tokens]
                if own is not extra:
                    if [t.shape for t in own] != [t.shape for t in extra]:
                        raise Unsupported(f"{method}'s learnable tensors depend on the length: the ones trained at "
                                          f"{train_tokens} tokens do not fit a build for {tokens}")
                    with torch.no_grad():
                        for mine, trained in zip(own, extra):
                            mine.copy_(trained)
                axis = 2 if caps.input_layout == "bhsd" else 1
                for name in learned:  # the trained maps fit this build's extra (same shape but the token axis)
                    trained = list(built[train_tokens][0].extras[name].shape)
                    trained[axis] = tokens
                    here = prepared.extras.get(name)
                    if here is None or list(here.shape) != trained:
                        raise Unsupported(f"{method}'s extra {name!r} learned at {train_tokens} tokens does not fit a "
                                          f"build for {tokens} ({None if here is None else tuple(here.shape)})")

                def call(q, k, v, **maps):
                    drawn = draw_extras(prepared, maps, seed, calls[0], q.device, q.dtype)
                    calls[0] += 1
                    return _call(prepared, caps, q, k, v, {**drawn, **maps})

                return call

        torch.manual_seed(stream_seed("icl-init", seed, heads, kind))
        model = ICLModel(heads, self.d, self.head_dim, float(self.params["init_std"]), kind, fn_for,
                         self.seq).to(device)
        if learned:  # made after W_KQ, W_OV: a method without extras keeps the initialisation it had
            prepared, caps = built[self.seq + 1][:2]
            model.extra_maps = extra_projections(self.d + 1, prepared, learned, caps.input_layout).to(device)
        model.extra = extra  # the method's own learnable tensors (Prepared.parameters), trained with the model
        return model

    def probe(self, method, seed=0, dtype="float32", device="cpu", options=None, method_params=None,
              max_wall_s=None) -> Outcome:
        from attnbench.methods import Unsupported

        started = time.perf_counter()
        deadline = None if max_wall_s is None else started + max_wall_s
        tdtype = getattr(torch, dtype)
        steps, batch = int(self.params["steps"]), int(self.params["batch"])
        runs = {"multi": (self.heads, "method")}
        if self.params["baselines"]:
            runs.update({"single": (1, "method"), "linear": (self.heads, "linear")})
        results, models = {}, {}
        final_loss = None
        for name, (heads, kind) in runs.items():
            try:
                model = self._model(method, heads, seed, dtype, device, options, method_params, kind)
            except Unsupported:
                if name == "multi":
                    raise
                continue
            gen = torch.Generator().manual_seed(stream_seed(self.name, "train", seed, name))
            losses, problem = self._train(model, steps, batch, gen, device, tdtype, deadline)
            if problem and name == "multi":
                status = "diverged" if "loss became" in problem else "timeout"
                return Outcome(status=status, reason=problem, steps_done=len(losses),
                               train_wall_s=time.perf_counter() - started)
            if problem:
                results[name] = {"problem": problem}
                continue
            if name == "multi":
                final_loss = sum(losses[-max(1, len(losses) // 10):]) / max(1, len(losses[-max(1, len(losses) // 10):]))
            results[name] = {}
            for f in self.params["test_factors"]:
                try:  # at f x L the method is built again, for f L + 1 tokens
                    results[name][f"mse@{f}x"] = self._mse(model, f * self.seq, seed, device, tdtype)
                except Unsupported as exc:
                    results[name][f"problem@{f}x"] = str(exc)
            models[name] = model
        multi = models["multi"]
        gen = torch.Generator().manual_seed(stream_seed(self.name, self.seq, seed, "mechanism"))
        z, target, x, y = icl_batch(batch, self.seq, self.d, self.noise, gen)
        with torch.no_grad():
            y_model = multi(z.to(device), tdtype).float().cpu()
        mech = mechanism(multi.cpu(), z, y_model)
        checks = dict(mech["checks"])
        first, last = (f"mse@{f}x" for f in (min(self.params["test_factors"]), max(self.params["test_factors"])))
        if first not in results["multi"]:
            raise Unsupported(results["multi"].get(f"problem@{min(self.params['test_factors'])}x", "no MSE"))
        if "single" in results and first in results["single"]:
            checks["multihead_beats_single"] = results["multi"][first] < results["single"][first]
        if "linear" in results and last in results["linear"] and last in results["multi"] and last != first:
            ours = results["multi"][last] / results["multi"][first]
            theirs = results["linear"][last] / results["linear"][first]
            checks["degrades_less_than_linear"] = ours < theirs
        ridge = ridge_mse(x[:, :-1], y[:, :-1], x[:, -1], target, self.noise)
        value = results["multi"][first]
        extras = {"checks": checks, "mechanism": mech["numbers"], "mse": results, "ridge_mse": ridge}
        breakdown = {k: v for k, v in results["multi"].items() if k.startswith("mse@")}
        return Outcome(status="ok", value=value, breakdown=breakdown, extras=extras, final_loss=final_loss,
                       steps_done=steps, train_wall_s=time.perf_counter() - started,
                       parameters=sum(p.numel() for p in multi.parameters()))


# ---- mqar_state_sweep -------------------------------------------------------------------------------------------
@register_task("mqar_state_sweep")
class MQARStateSweep(Task):
    """MQAR accuracy against the per-head Q/K width n (state size) at fixed width: the DSF protocol."""

    kind = "experiment"
    pattern = "causal_self"
    metric = "accuracy"
    defaults = None  # set below from MQAR's

    def setup(self):
        from .registry import TASKS

        dims = self.params["qk_dims"]
        if not dims or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in dims):
            raise self.error("qk_dims", f"must be positive integers, got {dims!r}")
        params = {k: v for k, v in self.params.items() if k != "qk_dims"}
        self.inner = TASKS["mqar"].make(params, self.seq)  # validates MQAR's parameters
        self.vocab, self.classes = self.inner.vocab, self.inner.classes
        heads, d_model = int(self.params["heads"]), int(self.params["d_model"])
        if d_model % heads:
            raise self.error("heads", f"must divide d_model={d_model}")
        self.params["d_model"] = d_model

    def probe(self, method, seed=0, dtype="float32", device="cpu", options=None, method_params=None,
              max_wall_s=None) -> Outcome:
        from .train import train_task

        started = time.perf_counter()
        heads, d_model = int(self.params["heads"]), int(self.params["d_model"])
        dv = d_model // heads
        layers = int(self.params["layers"])
        breakdown, states, outcomes = {}, {}, {}
        total_steps, wall = 0, 0.0
        for n in sorted(self.params["qk_dims"]):
            params = {k: v for k, v in self.params.items() if k != "qk_dims"}
            params["qk_dim"] = n
            left = None if max_wall_s is None else max(1.0, max_wall_s - (time.perf_counter() - started))
            outcome = train_task("mqar", params, self.seq, method, seed=seed, dtype=dtype, device=device,
                                 options=options, method_params=method_params, max_wall_s=left)
            outcomes[n] = outcome
            total_steps += outcome.steps_done
            wall += outcome.train_wall_s or 0.0
            if outcome.status != "ok":
                return Outcome(status=outcome.status, reason=f"qk_dim={n}: {outcome.reason}", breakdown=breakdown,
                               steps_done=total_steps, train_wall_s=wall)
            breakdown[f"n={n}"] = outcome.value
            size, source = state_per_layer(method, heads, n, dv, self.seq, dtype, device, options, method_params,
                                           seed)
            states[f"n={n}"] = {"state_per_layer": size, "state_source": source,
                                "linear_state_per_layer": heads * n * dv,  # nominal: one n×d_v matrix per head
                                "kv_cache_per_layer": heads * self.seq * (n + dv), "layers": layers}
        largest = max(self.params["qk_dims"])
        last = outcomes[largest]
        smallest = min(self.params["qk_dims"])
        # the DSF claim, tracked: more state does not make recall worse (by more than 5 points)
        extras = {"state": states, "checks": {"accuracy_not_worse_with_more_state":
                                              breakdown[f"n={largest}"] >= breakdown[f"n={smallest}"] - 0.05}}
        return Outcome(status="ok", value=breakdown[f"n={largest}"], breakdown=breakdown, extras=extras,
                       final_loss=last.final_loss, steps_done=total_steps, train_wall_s=wall,
                       tokens_per_s=last.tokens_per_s, peak_mem_mb=last.peak_mem_mb, parameters=last.parameters)


def state_per_layer(method: str, heads: int, n: int, dv: int, seq: int, dtype: str, device, options=None,
                    method_params=None, seed: int = 0) -> tuple[int | None, str]:
    """What one attention layer of ``method`` keeps per sequence to go on after ``seq`` tokens, in numbers (not
    bytes), and where the figure comes from: ``kv_cache`` (an exact method, softmax_rnn's exact recurrence
    included: heads·seq·(n + d_v)); ``decode`` (a method that declares a recurrent decode: measured, its
    ``prefill`` state over ``seq`` tokens of width n with its own tensors counted, so feature maps, normalisers,
    slots and expansions count as they are); or ``undeclared: ...`` (no recurrent decode, or a build that is
    ``Unsupported`` here: no figure rather than a formula that may not be the method's). Any other failure
    raises: the case then fails with it."""
    from attnbench.methods import METHODS, Unsupported
    from attnbench.methods.contract import tensor_elements

    from .model import DTYPES, build_method

    if METHODS[method].caps.exact:  # exact softmax attention (softmax_rnn's recurrence too) keeps every key
        return heads * seq * (n + dv), "kv_cache"
    case = task_case(method=method, mask="causal", mask_name="causal", batch=1, heads_q=heads, heads_kv=heads,
                     seq_q=seq, seq_kv=seq, head_dim=n, dtype=dtype, mode="fwd", seed=seed, device=str(device))
    try:
        prepared, caps = build_method(case, torch.device(device), options or {}, dict(method_params or {}),
                                      value_dim=dv if dv != n else None)
    except Unsupported as exc:
        return None, f"undeclared: the method does not build for the state measurement ({exc})"
    if prepared.decode is None:
        return None, "undeclared: the method declares no recurrent decode"
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[dtype]
    q, k = (torch.randn(1, heads, seq, n, generator=gen, device=device).to(dt) for _ in range(2))
    v = torch.randn(1, heads, seq, dv, generator=gen, device=device).to(dt)
    if caps.input_layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    kwargs = {name: extra.make(gen, torch.device(device), dt) for name, extra in prepared.extras.items()}
    with torch.no_grad():
        if prepared.prepare is not None:
            kwargs.update(prepared.prepare(q, k, v, **kwargs) or {})
        state = prepared.decode.prefill(q, k, v, **kwargs)
    return tensor_elements(state), "decode"


def _mqar_defaults():
    from .recall import MQAR

    return {**MQAR.defaults, "qk_dims": [4, 8, 16, 32]}


MQARStateSweep.defaults = _mqar_defaults()


# ---- rf_attention_probe -----------------------------------------------------------------------------------------
def sphere(n: int, count: int, d: int, gen) -> torch.Tensor:
    x = torch.randn(n, count, d, generator=gen, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True) * math.sqrt(d)


def rf_targets(x0, xs, beta, name: str) -> torch.Tensor:
    d = x0.shape[-1]
    if name == "quadratic":
        return ((xs @ beta) * (xs @ x0[..., None])[..., 0]).mean(1) / math.sqrt(d)
    if name == "cubic":
        return ((xs @ x0[..., None])[..., 0] / math.sqrt(d)).pow(3).mean(1)
    if name == "control":
        return xs[:, 0] @ beta
    raise ValueError(name)


def ridge_fit(phi: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_V |phi V - y|²/n + lam |V|²: primal or dual closed form, whichever is smaller (fp64)."""
    n, p = phi.shape
    if p <= n:
        return torch.linalg.solve(phi.T @ phi + lam * n * torch.eye(p, dtype=phi.dtype), phi.T @ y)
    return phi.T @ torch.linalg.solve(phi @ phi.T + lam * n * torch.eye(n, dtype=phi.dtype), y)


def ridge_select(phi_train, y_train, phi_val, y_val, lambdas):
    best = None
    for lam in lambdas:
        w = ridge_fit(phi_train, y_train, lam)
        err = float((phi_val @ w - y_val).pow(2).mean())
        if best is None or err < best[0]:
            best = (err, lam, w)
    return best[1], best[2]


@register_task("rf_attention_probe")
class RFAttentionProbe(Task):
    """One attention layer with frozen random QK and ridge-fitted values, against a random-feature MLP."""

    kind = "experiment"
    pattern = "noncausal_cross"
    metric = "mse"
    higher_is_better = False
    defaults = {"seq_lens": [8], "d": 8, "features": 256, "samples": [256, 1024], "test": 1024, "bias_mean": 0.0,
                "targets": ["quadratic", "cubic", "control"], "lambdas": [1e-6, 1e-4, 1e-2, 1.0], "batch": 256}

    def setup(self):
        self.d = self.int_param("d", 2)
        self.features = self.int_param("features")
        self.int_param("test", 2)
        self.int_param("batch")  # examples per attention call
        self.float_param("bias_mean", -100.0, 100.0)
        samples = self.params["samples"]
        if not samples or any(isinstance(s, bool) or not isinstance(s, int) or s < 2 for s in samples):
            raise self.error("samples", f"must be integers >= 2, got {samples!r}")
        bad = [t for t in self.params["targets"] if t not in ("quadratic", "cubic", "control")]
        if bad or not self.params["targets"]:
            raise self.error("targets", f"must be among quadratic, cubic, control, got {self.params['targets']!r}")
        self.seq_q, self.seq_kv = 1, self.seq
        self.params.setdefault("heads", self.features)
        self.params["heads"], self.params["d_model"] = self.features, self.features * self.d

    def attention_features(self, fn, x0, xs, w, dtype, device):
        """φ = [Σ_i a_{m,i} x_i]_m, flattened ``[n, M·d]`` (the method on q = W_mᵀx₀ (× √d), k = v = x_i)."""
        parts = []
        chunk = int(self.params["batch"])
        scale = math.sqrt(self.d)
        w = w.float().to(device)  # made on the CPU (seeded there, as the data): the method runs on `device`
        with torch.no_grad():
            for i in range(0, x0.shape[0], chunk):
                a, b = x0[i:i + chunk].to(device), xs[i:i + chunk].to(device)
                q = torch.einsum("bd,mde->bme", a.float(), w)[:, :, None] * scale
                kv = b.float()[:, None].expand(-1, self.features, -1, -1)
                out = fn(q.to(dtype), kv.to(dtype), kv.to(dtype))
                parts.append(out[:, :, 0].double().cpu().flatten(1))
        return torch.cat(parts)

    def mlp_features(self, x0, xs, w):
        flat = torch.cat([x0, xs.flatten(1)], dim=1)
        return torch.relu(flat @ w / math.sqrt(flat.shape[1]))

    def probe(self, method, seed=0, dtype="float32", device="cpu", options=None, method_params=None,
              max_wall_s=None) -> Outcome:
        started = time.perf_counter()
        d, count, m = self.d, self.seq, self.features
        chunk = int(self.params["batch"])
        case = _case(self, method, chunk, m, 1, count, d, dtype, seed, device, mode="fwd")
        prepared, caps = build_method(case, torch.device(device), dict(options or {}), method_params or {})
        untrained_extras(self.name, method, prepared, caps, count, "fits the values in closed form with nothing "
                         "trained (the query-key maps are frozen random draws)")
        tdtype = getattr(torch, dtype)
        # extras without a token axis: drawn once (frozen, like W); the prepare step runs per call (call_method)
        fixed = draw_extras(prepared, (), seed, 0, torch.device(device), tdtype)

        def fn(q, k, v):
            batch = q.shape[0]
            if batch < chunk:  # the method was built for `chunk` examples: pad the last chunk
                pad = chunk - batch
                q, k, v = (torch.cat([t, t[:1].expand(pad, *t.shape[1:])]) for t in (q, k, v))
            return _call(prepared, caps, q, k, v, fixed)[:batch]

        gen = torch.Generator().manual_seed(stream_seed(self.name, seed, "weights"))
        w = (torch.randn(m, d, d, generator=gen, dtype=torch.float64) / d
             + float(self.params["bias_mean"]) * torch.eye(d, dtype=torch.float64) / d)
        w_mlp = torch.randn((count + 1) * d, m * d, generator=gen, dtype=torch.float64)
        beta = torch.randn(d, generator=gen, dtype=torch.float64)
        beta = beta / beta.norm()
        largest, test_n = max(self.params["samples"]), int(self.params["test"])
        data_gen = torch.Generator().manual_seed(stream_seed(self.name, seed, "data"))
        total = largest + 2 * test_n  # train pool, validation, test
        x0, xs = sphere(total, 1, d, data_gen)[:, 0], sphere(total, count, d, data_gen)
        phi_attn = self.attention_features(fn, x0, xs, w, tdtype, device)
        phi_mlp = self.mlp_features(x0, xs, w_mlp)
        val, test = slice(largest, largest + test_n), slice(largest + test_n, total)
        breakdown, fitted = {}, {}
        lambdas = [float(x) for x in self.params["lambdas"]]
        for target in self.params["targets"]:
            y = rf_targets(x0, xs, beta, target)
            var = float(y[test].var())
            for n in sorted(self.params["samples"]):
                for model, phi in (("rfa", phi_attn), ("rfmlp", phi_mlp)):
                    lam, weights = ridge_select(phi[:n], y[:n], phi[val], y[val], lambdas)
                    breakdown[f"{target}/{model}/n={n}"] = float((phi[test] @ weights - y[test]).pow(2).mean()) / var
                    if model == "rfa" and n == largest:
                        fitted[target] = weights
        # key-permutation invariance of the fitted model, on the test set
        perm = torch.randperm(count, generator=data_gen)
        phi_perm = self.attention_features(fn, x0[test], xs[test][:, perm], w, tdtype, device)
        first = self.params["targets"][0]
        invariance = float((phi_perm @ fitted[first] - phi_attn[test] @ fitted[first]).abs().max()
                           / (phi_attn[test] @ fitted[first]).abs().max().clamp_min(1e-12))
        tol = 1e-4 if dtype == "float32" else 2e-2
        checks = {"key_permutation_invariant": invariance < tol}
        for target in ("quadratic", "cubic"):
            if target in self.params["targets"]:
                checks[f"rfa_below_rfmlp[{target}]"] = (breakdown[f"{target}/rfa/n={largest}"]
                                                        < breakdown[f"{target}/rfmlp/n={largest}"])
        value = breakdown[f"{first}/rfa/n={largest}"]
        extras = {"checks": checks, "permutation_rel_err": invariance}
        return Outcome(status="ok", value=value, breakdown=breakdown, extras=extras,
                       train_wall_s=time.perf_counter() - started, parameters=m * d)
