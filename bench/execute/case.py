"""One case, measured: build, preparation, first call (compile), correctness gate, memory, timing, telemetry.

``CaseRunner.run(case)`` returns a row (dict, ``attnbench.record.schema`` columns) for a case that ran to a
verdict (``ok``, ``wrong`` or ``unsupported``); failures (exceptions, OOM) propagate to the worker, which
makes their rows and replaces itself. Inputs and the fp32 reference are cached for the last input key, so the
methods of one shape share them (the planner orders cases that way). The method contract the runner serves
(own reference, untimed preparation, extras, parameters, recurrent decode, layer form) is
``attnbench.methods.contract``.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import inspect
import json
import math
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field

import torch

from attnbench import masks
from attnbench.config.plan import Case
from attnbench.measure import gate
from attnbench.measure import timing as timers
from attnbench.measure.gate import rel_error  # noqa: F401  (re-exported: tests and scripts use it from here)
from attnbench.methods import METHODS, BuildContext, MaskInfo, Unsupported, as_prepared, tensor_bytes
from attnbench.methods.exact.reference import reference_attention
from attnbench.record.rows import describe

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# approximate methods: queries whose hidden keys the leak probe perturbs
LEAK_PROBE_QUERIES = 64
# dense bf16/fp16 datasheet peaks: a row above its device's peak is flagged as impossible
DATASHEET_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "B200": 2250.0}
# HBM datasheet bandwidth, GB/s: bytes_moved is a floor, so a row above it read from a cache (or is wrong)
DATASHEET_GBPS = {"H100": 3350.0, "H200": 4800.0, "H800": 3350.0, "A100": 2039.0, "B200": 8000.0}
# above this many (query, key) pairs the gate samples query rows (forward only); see correctness.ref_full_pairs
REF_FULL_PAIRS = 1 << 32
GATE_SAMPLE_ROWS = 512
# ... and checks the gradients on a prefix of P tokens, P² <= ref_full_pairs, a multiple of this block (or of the
# largest power of two below √ref_full_pairs, and of the method's chunk), where the case allows it
# (CaseRunner._grad_prefix); a prefix shorter than correctness.grad_prefix_min is not used
PREFIX_BLOCK = 4096
GRAD_PREFIX_MIN = 1024


@dataclass
class Inputs:
    key: tuple
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor


@dataclass
class Reference:
    key: tuple
    out: torch.Tensor  # fp32, [B, H, rows, D]: every row, or the sampled rows
    grads: tuple | None
    rows: torch.Tensor | None  # sampled query rows (None: all rows)
    rows_visible: torch.Tensor  # bool [seq_q]: rows with at least one visible key


@dataclass
class Call:
    """The tensors of one case in the method's layout, and the calls the runner makes with them."""

    args: tuple  # positional inputs: (q, k, v) or (x,)
    kwargs: dict  # extras and what ``prepare`` returned
    grad_targets: list = field(default_factory=list)  # (name, tensor) pairs that get gradients
    dout: torch.Tensor | None = None


# the compiler settings a case may change (flex: fail_on_recompile_limit_hit, donated_buffer), put back after it
COMPILER_CONFIGS = ("torch._dynamo.config", "torch._functorch.config")
_IMPORTED_SETTINGS: dict[str, bytes] = {}  # such a module's settings as its import left them (_ConfigImports)


class _ConfigImports(importlib.abc.MetaPathFinder):
    """Records a compiler config module's settings the moment its import finishes, so the case that first imports
    it (the first compiled case of a worker) gets them put back like a case that found it imported."""

    def find_spec(self, name, path, target=None):
        if name not in COMPILER_CONFIGS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return None  # the usual import (a case that imports it then keeps what it set)
        exec_module = spec.loader.exec_module  # a loader of this spec alone

        def exec_and_record(module):
            exec_module(module)
            _IMPORTED_SETTINGS[name] = module.save_config()

        spec.loader.exec_module = exec_and_record
        return spec


if not any(isinstance(finder, _ConfigImports) for finder in sys.meta_path):
    sys.meta_path.insert(0, _ConfigImports())


@contextlib.contextmanager
def _compiler_config_restored():
    """Snapshot dynamo's and AOTAutograd's settings and put them back, so no case changes a later one. A config
    module not imported yet is left so (importing torch._dynamo takes ~1.5 s of CPU, in every worker, rank and
    training process, most of which compile nothing): should the case import it, the settings its import left
    (``_ConfigImports``) are put back."""
    saved = {name: sys.modules[name].save_config() for name in COMPILER_CONFIGS if name in sys.modules}
    try:
        yield
    finally:
        with warnings.catch_warnings():  # restoring deprecated no-op keys warns; nothing to report
            warnings.simplefilter("ignore", FutureWarning)
            for name in COMPILER_CONFIGS:
                module = sys.modules.get(name)
                state = saved.get(name, _IMPORTED_SETTINGS.get(name))
                if module is not None and state is not None:
                    module.load_config(state)


class _Verdict(Exception):
    """Raised inside a case to end it with a row status (wrong/unsupported) and a reason."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _seed(case: Case, name: str) -> int:
    return (case.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _float_copy(t: torch.Tensor, need_grad: bool) -> torch.Tensor:
    if not t.is_floating_point():  # indices (e.g. a prepared random draw of positions) stay integers
        return t.detach()
    return t.detach().float().requires_grad_(need_grad and t.requires_grad)


class CaseRunner:
    def __init__(self, device: str, options: dict):
        self.device = torch.device(device)
        self.options = options
        self.timing = options["timing"]
        self.phase = "idle"
        self.phase_hook = None  # called with each new phase (the worker reports it to the parent)
        self._inputs: Inputs | None = None
        self._reference: Reference | None = None
        self._prefix_grads: tuple | None = None  # ((input key, P), the exact reference's gradients on the prefix)
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.telemetry = None
        if self.device.type == "cuda" and self.timing.get("telemetry", True):
            from attnbench.measure.telemetry import Telemetry

            self.telemetry = Telemetry.open(self.device.index or 0)
        self.power_limit_w = self.telemetry.power_limit_w() if self.telemetry else None
        calibration = options.get("calibration") or {}
        # the rates no row may exceed: the datasheet's dense 16-bit peak and HBM bandwidth, else the measured
        # matmul rate and copy bandwidth (bytes_moved is a floor, so GB/s above the peak means a cache or a bug)
        self.peak_tflops = self._peak(DATASHEET_TFLOPS, calibration.get("matmul_bf16_tflops"), 1.0)
        self.peak_gbps = self._peak(DATASHEET_GBPS, calibration.get("copy_tbps"), 1e3)

    def _peak(self, datasheet: dict, measured, scale: float) -> float | None:
        if self.device.type != "cuda":
            return None
        listed = next((v for k, v in datasheet.items() if k in self.device_name), None)
        if listed is None and measured:
            return scale * float(measured)
        return listed

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        if self.phase_hook is not None:
            self.phase_hook(phase)

    # ---- inputs and the exact reference --------------------------------------------------------------------
    def inputs(self, case: Case) -> Inputs:
        key = case.input_key()
        if self._inputs is not None and self._inputs.key == key:
            return self._inputs
        self._inputs = self._reference = self._prefix_grads = None
        gen = torch.Generator(device=self.device).manual_seed(case.seed)
        dtype = TORCH_DTYPES[case.dtype]

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=self.device, dtype=torch.float32).to(dtype)

        q = randn(case.batch, case.heads_q, case.seq_q, case.head_dim)
        k = randn(case.batch, case.heads_kv, case.seq_kv, case.head_dim)
        v = randn(case.batch, case.heads_kv, case.seq_kv, case.head_dim)
        dout = randn(case.batch, case.heads_q, case.seq_q, case.head_dim)
        self._inputs = Inputs(key, q, k, v, dout)
        return self._inputs

    def _gate_rows(self, case: Case) -> torch.Tensor | None:
        """Query rows the gate checks: all (None) up to ``ref_full_pairs``, else a strided sample with the
        first and last rows (the reference then costs rows x seq_kv, whatever the length)."""
        limit = int(self.options.get("ref_full_pairs", REF_FULL_PAIRS))
        if case.seq_q * case.seq_kv <= limit:
            return None
        count = min(case.seq_q, GATE_SAMPLE_ROWS)
        rows = torch.linspace(0, case.seq_q - 1, count, device=self.device).round().long().unique()
        return rows

    def reference(self, case: Case, inputs: Inputs, bound, need_grad: bool) -> Reference:
        """fp32 softmax attention on the case's inputs (cached per input key; with gradients when asked)."""
        cached = self._reference
        if cached is not None and cached.key == inputs.key and (cached.grads is not None or not need_grad):
            return cached
        chunk = self.options.get("ref_chunk_bytes", 1 << 29)
        rows = self._gate_rows(case)
        rows_visible = (bound.row_counts() > 0).to(self.device)
        if rows is None:
            dout = inputs.dout if need_grad else None
            out32, grads32 = reference_attention(inputs.q, inputs.k, inputs.v, bound, dout=dout, chunk_bytes=chunk)
        else:
            out32 = _sampled_reference(inputs.q, inputs.k, inputs.v, bound, rows, chunk)
            grads32 = None
        self._reference = Reference(inputs.key, out32, grads32, rows, rows_visible)
        return self._reference

    def prefix_reference(self, inputs: Inputs, bound, length: int) -> tuple:
        """The fp32 reference's gradients (dq, dk, dv) on the first ``length`` positions of a self-attention
        case: q, k, v and dout cut there, the mask's ``length x length`` corner (cached per input key and length).
        Where the mask is closed at ``length`` and dout is 0 from ``length`` on, they are the whole case's
        gradients before ``length`` (and 0 after): the prefix gate of long cases (``_grad_prefix``)."""
        key = (inputs.key, length)
        if self._prefix_grads is not None and self._prefix_grads[0] == key:
            return self._prefix_grads[1]
        chunk = self.options.get("ref_chunk_bytes", 1 << 29)
        q, k, v, dout = (t[:, :, :length] for t in (inputs.q, inputs.k, inputs.v, inputs.dout))
        _, grads = reference_attention(q, k, v, bound.prefix_corner(length), dout=dout, chunk_bytes=chunk)
        self._prefix_grads = (key, grads)
        return grads

    # ---- the case ------------------------------------------------------------------------------------------
    def run(self, case: Case, run_id: str = "") -> dict:
        """Measure ``case``; compiler settings a builder changes are restored afterwards (DESIGN.md §7)."""
        with _compiler_config_restored():
            started = time.perf_counter()
            row = describe(case, run_id, self.device_name)
            try:
                return self._run(case, row, started)
            except _Verdict as verdict:
                return self._finish(row, verdict.status, verdict.reason, started)

    def _run(self, case: Case, row: dict, started: float) -> dict:
        self._set_phase("inputs")
        spec = masks.make_mask(case.mask)
        bound = spec.bind(case.seq_q, case.seq_kv).to(self.device)
        method = METHODS[case.method]
        caps = method.caps
        ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=self.device,
                           dtype=TORCH_DTYPES[case.dtype], options=self.options,
                           params=dict((self.options.get("method_options") or {}).get(case.method) or {}))

        self._set_phase("build")
        t0 = time.perf_counter()
        resident_before = self._allocated()
        prepared = self._declined(caps, lambda: as_prepared(method.build(ctx)))
        resolved = getattr(prepared.fn, "resolved", None)  # the code path an `auto` option chose for this case
        if resolved:
            row["resolved_options"] = json.dumps(resolved, sort_keys=True, default=str)
        # what the builder allocated and keeps for every call (a dense bias, a BlockMask, weights): it is resident
        # while the call runs, so it counts in peak_mem_mb (measured before any input exists)
        resident_bytes = max(0, self._allocated() - resident_before) if resident_before is not None else 0
        if not caps.exact and prepared.reference is None:
            raise _Verdict("error", f"approximate method {case.method!r} gives no reference (Prepared.reference): "
                                    "its fast path cannot be gated")
        if caps.form == "layer" and prepared.reference is None:
            raise _Verdict("error", f"layer-form method {case.method!r} gives no reference (Prepared.reference): "
                                    "a layer is gated against its own reference only")
        recurrent = case.mode == "decode" and prepared.decode is not None
        call = self._call(case, caps, prepared, recurrent)
        prefix = self._grad_prefix(case, caps, prepared, call, bound, recurrent)
        # the gate's backward on a prefix: the first call's output gradient is 0 from position P on
        gate_dout = _zero_after(call.dout, _seq_axis(caps), prefix[0]) if prefix[0] else None

        self._set_phase("first call")
        timed, first = self._closures(case.mode, prepared, call, recurrent, gate_dout)
        out, grads = self._declined(caps, first)
        del first, gate_dout  # the timed calls use the case's own dout
        self._sync()
        row["compile_s"] = time.perf_counter() - t0

        self._set_phase("correctness")
        self._gate(case, caps, prepared, call, bound, out, grads, row, recurrent, prefix)
        del out, grads

        if not caps.exact and caps.form == "qkv" and not recurrent:
            self._set_phase("leak check")
            leak = self._leak(prepared, call, bound, caps.input_layout == "bshd")
            if leak:
                raise _Verdict("wrong", leak)
        if recurrent:
            self._set_phase("decode check")
            self._check_step_is_recurrent(prepared, call)
            state = call.kwargs["_state"]
            measured = prepared.decode.state_bytes(state) if prepared.decode.state_bytes else None
            row["state_bytes"] = measured if measured is not None else tensor_bytes(state) // max(1, case.batch)
        if prepared.attended_pairs is not None:
            with torch.no_grad():
                pairs = int(prepared.attended_pairs(*call.args, **call.kwargs))
            row["attended_pairs"] = pairs

        self._set_phase("memory")
        row.update(self._memory(case, prepared, timed, call, resident_bytes))
        self._set_phase("timing")
        with self._no_recompile(caps.compiled):
            # primed: the memory phase has just run the timed call (for bwd, its forward and backward)
            result = timers.time_callable(timed, self.device, self.timing,
                                          allow_graph=case.mode in ("fwd", "decode"), primed=True)
            telemetry = self._telemetry(timed, result.ms_median)
            phases = self._phases(prepared, call, result.ms_median)
            profiled = {}
            if int(self.timing.get("profile_calls") or 0) > 0:  # after the timed calls: never in ms_median
                from attnbench.measure.profile import profile_call

                self._set_phase("profile")
                profiled = profile_call(timed, self.device, int(self.timing["profile_calls"]))
        row.update(result.columns())  # medians, spread, every repetition's time (ms_samples)
        if result.flags:  # e.g. cpu_interference(...) from the timer
            row["flags"] = ";".join([f for f in (row.get("flags") or "").split(";") if f] + list(result.flags))
        row.update(telemetry)
        row.update(phases)
        row.update(profiled)
        self._rates(case, prepared, row, result.ms_median)
        return self._finish(row, "ok", None, started)

    # ---- building the call -----------------------------------------------------------------------------------
    def _declined(self, caps, thunk):
        """Run ``thunk``; ``Unsupported`` (or a backend's declining error) ends the case as unsupported."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return thunk()
            except Unsupported as exc:
                raise _Verdict("unsupported", str(exc)) from None
            except Exception as exc:
                declined = caps.declined(exc)
                if declined is not None:
                    notes = "; ".join(dict.fromkeys(str(w.message).split("\n")[0] for w in caught))
                    raise _Verdict("unsupported", f"{declined} {notes}".strip()) from None
                raise

    def _call(self, case: Case, caps, prepared, recurrent: bool) -> Call:
        """Fresh leaves in the method's layout, the extras, and the untimed preparation."""
        need_grad = case.needs_grad
        inputs = self.inputs(case)
        dtype = TORCH_DTYPES[case.dtype]
        if caps.form == "layer":
            gen = torch.Generator(device=self.device).manual_seed(_seed(case, "x"))
            width = case.heads_q * case.head_dim
            x = torch.randn(case.batch, case.seq_q, width, generator=gen, device=self.device).to(dtype)
            dout = torch.randn(case.batch, case.seq_q, width, generator=gen, device=self.device).to(dtype)
            call = Call((x.requires_grad_(need_grad),), {}, [("dx", x)] if need_grad else [], dout)
        else:
            bshd = caps.input_layout == "bshd"

            def laid_out(t):  # the method's layout, as fresh leaves (made outside the timed region)
                t = t.detach()
                t = t.transpose(1, 2).contiguous() if bshd else t
                return t.requires_grad_(need_grad)

            q, k, v = laid_out(inputs.q), laid_out(inputs.k), laid_out(inputs.v)
            dout = inputs.dout.transpose(1, 2).contiguous() if bshd else inputs.dout
            targets = [("dq", q), ("dk", k), ("dv", v)] if need_grad else []
            call = Call((q, k, v), {}, targets, dout)
        for name, extra in prepared.extras.items():
            gen = torch.Generator(device=self.device).manual_seed(_seed(case, name))
            tensor = extra.make(gen, self.device, dtype).requires_grad_(need_grad and extra.grad)
            call.kwargs[name] = tensor
            if need_grad and extra.grad:
                call.grad_targets.append((f"d{name}", tensor))
        if need_grad:
            for index, param in enumerate(prepared.parameters):
                if param.requires_grad:
                    call.grad_targets.append((f"dparam{index}", param))
        if prepared.prepare is not None:
            self._set_phase("prepare")
            with torch.no_grad():
                extra_kwargs = prepared.prepare(*call.args, **call.kwargs) or {}
            if not isinstance(extra_kwargs, dict):
                raise TypeError("Prepared.prepare must return a dict of keyword arguments")
            call.kwargs.update(extra_kwargs)
        if recurrent:
            with torch.no_grad():
                call.kwargs["_state"] = prepared.decode.prefill(*call.args, **call.kwargs)
        return call

    def _closures(self, mode, prepared, call: Call, recurrent: bool, gate_dout: torch.Tensor | None = None):
        """(timed call, first call returning (out, grads or None)) for a mode. The first call's gradients (the
        ones the gate compares) are taken with ``gate_dout`` where given (the prefix gate's, 0 from position P
        on), else with the case's ``call.dout``, as every timed call is."""
        fn = prepared.fn
        args, kwargs = call.args, call.kwargs
        if recurrent:
            state = kwargs["_state"]
            step_kwargs = {k: v for k, v in kwargs.items() if k != "_state"}

            def step():
                with torch.no_grad():
                    return prepared.decode.step(state, *args, **step_kwargs)

            return step, lambda: (step(), None)
        if mode in ("fwd", "decode"):
            def call_fwd():
                with torch.no_grad():
                    return fn(*args, **kwargs)

            return call_fwd, lambda: (call_fwd(), None)
        targets = [t for _, t in call.grad_targets]
        names = [n for n, _ in call.grad_targets]

        def grads_of(out):
            if not out.requires_grad:
                raise _Verdict("wrong", "the output does not depend on the inputs (no gradient path from "
                                        f"{', '.join(names)}): it cannot be a function of q, k, v")
            dout = call.dout if gate_dout is None else gate_dout
            grads = torch.autograd.grad(out, targets, dout, retain_graph=mode == "bwd", allow_unused=True)
            unused = [n for n, g in zip(names, grads) if g is None]
            if unused:
                raise _Verdict("wrong", f"the output does not depend on {', '.join(unused)} (no gradient)")
            return grads

        if mode == "bwd":
            out = fn(*args, **kwargs)

            def call_bwd():
                return torch.autograd.grad(out, targets, call.dout, retain_graph=True)

            return call_bwd, lambda: (out.detach(), grads_of(out))

        def call_fwd_bwd():
            o = fn(*args, **kwargs)
            return o, torch.autograd.grad(o, targets, call.dout)

        def first():
            o = fn(*args, **kwargs)
            return o.detach(), grads_of(o)

        return call_fwd_bwd, first

    # ---- the gate --------------------------------------------------------------------------------------------
    def _gate(self, case, caps, prepared, call: Call, bound, out, grads, row, recurrent: bool,
              prefix: tuple = (None, None)) -> None:
        """Compare with the reference (exact: harness fp32 softmax; approximate: the method's own, in fp32);
        record ``rel_err``, ``err_tol`` and, for approximate methods, ``approx_err``. Raises a verdict.
        ``prefix``: ``_grad_prefix``'s (P, reason): a long case's gradients (taken with dout 0 from P on) are
        compared with the reference's on the first P positions, or, with a reason, not compared."""
        length, why_not = prefix
        not_gated = "grads_not_gated(seq_q*seq_kv>ref_full_pairs" + (f": {why_not})" if why_not else ")")
        method_grads = grads  # in the method's layout (the own reference's prefix gradients are too)
        bshd = caps.input_layout == "bshd" and caps.form == "qkv"
        if bshd:
            out = out.transpose(1, 2)
            grads = None if grads is None else tuple(g.transpose(1, 2) if g.dim() == 4 else g for g in grads)
        names = [n for n, _ in call.grad_targets]
        tolerance = self.options.get("tolerance")
        exact_ref = None
        if caps.form == "qkv" and (caps.exact or prepared.softmax_comparable):
            exact_ref = self.reference(case, self.inputs(case), bound, case.needs_grad and caps.exact)
        if caps.exact and caps.form == "qkv":  # a layer is not a function of q, k, v: own reference only
            pairs = [("out", self._rows(out, exact_ref), self._rows(exact_ref.out, exact_ref, sampled=True))]
            if grads is not None and exact_ref.grads is not None:
                pairs += [(n, g, w) for n, g, w in zip(names, grads, exact_ref.grads)]
            elif grads is not None and length:  # q, k, v gradients, [B, H, S, D] here: the sequence is axis 2
                want = self.prefix_reference(self.inputs(case), bound, length)
                pairs += [(n, gate.Prefixed(g, 2, length), w) for n, g, w in zip(names, grads, want)]
                row["flags"] = _add_flag(row.get("flags"), f"grads_gated_on_prefix({length})")
            elif grads is not None:
                row["flags"] = _add_flag(row.get("flags"), not_gated)
            verdict = gate.compare(pairs, case.dtype, tolerance)
            if verdict.failure is None and caps.form == "qkv":
                empty = ~exact_ref.rows_visible
                verdict.failure = gate.empty_rows_failure(out, grads[0] if grads else None, empty, seq_dim=2)
        else:
            rows = self._own_reference_rows(case, caps, prepared, recurrent)
            want_out, want_grads = self._own_reference(case, caps, prepared, call, bshd, recurrent, rows)
            if rows is None:
                pairs = [("out", out, want_out)]
            else:  # a long case: the own reference ran on a sample of query rows, forward only
                pairs = [("out", out[:, rows] if caps.form == "layer" else out[:, :, rows], want_out)]
                if grads is not None and length:  # gradients: the own reference's on the prefix
                    pairs += self._own_prefix_pairs(case, caps, prepared, call, method_grads, length)
                    row["flags"] = _add_flag(row.get("flags"), f"grads_gated_on_prefix({length})")
                    grads = None
                elif grads is not None:
                    row["flags"] = _add_flag(row.get("flags"), not_gated)
                    grads = None
            if grads is not None:
                pairs += [(n, g, w) for n, g, w in zip(names, grads, want_grads)]
            verdict = gate.compare(pairs, case.dtype, tolerance)
            if exact_ref is not None and not recurrent:
                row["approx_err"] = rel_error(self._rows(out, exact_ref)[:, :, self._visible(exact_ref)],
                                              self._rows(exact_ref.out, exact_ref, sampled=True)[:, :, self._visible(exact_ref)])
            elif exact_ref is not None and recurrent:
                row["approx_err"] = rel_error(out, exact_ref.out)
            else:
                row["flags"] = _add_flag(row.get("flags"), "approx_err_na(different_operator)")
        row["rel_err"], row["err_tol"] = verdict.rel_err, verdict.err_tol
        if verdict.failure:
            raise _Verdict("wrong", verdict.failure)

    @staticmethod
    def _rows(t: torch.Tensor, ref: Reference, sampled: bool = False) -> torch.Tensor:
        """The gated query rows of ``t`` ([B, H, S, D]); a reference tensor already holds only those."""
        if ref.rows is None or sampled:
            return t
        return t[:, :, ref.rows]

    @staticmethod
    def _visible(ref: Reference) -> torch.Tensor:
        return ref.rows_visible if ref.rows is None else ref.rows_visible[ref.rows]

    def _own_reference_rows(self, case, caps, prepared, recurrent: bool):
        """Query rows on which a long case's own reference is computed: like the exact reference, above
        ``ref_full_pairs`` a strided sample of rows, where the reference takes ``rows=`` (a keyword that
        returns only those rows, ``[B, H, len(rows), D]``, or ``[B, len(rows), H, D]`` for a ``bshd`` method,
        ``[B, len(rows), width]`` for a layer); else None (every row)."""
        if recurrent or not _accepts(prepared.reference, "rows"):
            return None
        return self._gate_rows(case)

    # ---- the prefix gate of long cases' gradients ---------------------------------------------------------------
    def _prefix_length(self, prepared) -> int:
        """P: the largest multiple of the prefix block with P² <= ``ref_full_pairs``. The block is
        ``PREFIX_BLOCK`` (or the largest power of two <= √ref_full_pairs, when that is smaller), times what
        makes it a multiple of the method's ``Prepared.chunk`` too (else the chunk alone); 0 where none fits."""
        root = math.isqrt(int(self.options.get("ref_full_pairs", REF_FULL_PAIRS)))
        if root < 1:
            return 0
        block = min(PREFIX_BLOCK, 1 << (root.bit_length() - 1))
        chunk = prepared.chunk
        if chunk:
            block = math.lcm(block, chunk) if math.lcm(block, chunk) <= root else chunk
        return root // block * block

    def _grad_prefix(self, case, caps, prepared, call: Call, bound, recurrent: bool) -> tuple:
        """(P, None) where a backward case whose gradients the gate would not check (above ``ref_full_pairs``:
        the reference runs on sampled rows, forward only) can have them checked on its first P positions; else
        (None, why not), or (None, None) where the gate computes every gradient anyway (or there are none).

        The gate's backward then runs with an output gradient that is 0 from position P on. If no query before
        P sees a key at or after P (the bound mask is closed at P, checked on the mask, not read from its name)
        and the method's outputs before P depend on its inputs before P only (``Capabilities.closed_on_prefixes``),
        its gradients before P are those of the same computation on the first P positions, and 0 after; the
        reference computes those on P x P pairs (the exact one on the mask's corner, an own reference on the
        inputs cut at P), so the cost is a case's at ``ref_full_pairs`` whatever the length, and no extra call
        of the method is made. Self-attention only (cross attention has no common prefix)."""
        if not case.needs_grad or recurrent or not call.grad_targets:
            return None, None
        if caps.exact and caps.form == "qkv":
            long = self._gate_rows(case) is not None
        else:
            long = self._own_reference_rows(case, caps, prepared, recurrent) is not None
        if not long:
            return None, None
        if not caps.closed_on_prefixes():
            return None, "not prefix_closed"
        if case.seq_q != case.seq_kv:
            return None, "cross attention"
        length = self._prefix_length(prepared)
        minimum = int(self.options.get("grad_prefix_min", GRAD_PREFIX_MIN))
        if length < max(1, minimum):
            return None, f"prefix {length} < grad_prefix_min {minimum}"
        past = bound.pairs_past_prefix(length)
        if past is None:
            return None, f"mask closure at {length} not checked"
        if past:
            return None, f"mask not closed at {length}"
        if not (caps.exact and caps.form == "qkv"):
            try:
                _token_axes(call, case.seq_q, _seq_axis(caps))
            except ValueError as exc:
                return None, str(exc)
        return length, None

    def _own_prefix_pairs(self, case, caps, prepared, call: Call, grads, length: int) -> list:
        """(name, got, want) for every gradient target: the method's gradients (``grads``, its layout; taken
        with dout 0 from ``length`` on) against its own reference's in fp32 on the inputs cut at ``length``
        (each per-token tensor along its sequence axis, the others whole: parameters, feature draws), with the
        cut dout. Per-token gradients are :class:`gate.Prefixed` (0 expected after the prefix)."""
        arg_axes, kwarg_axes, target_axes = _token_axes(call, case.seq_q, _seq_axis(caps))

        def head(t, axis):
            return t if axis is None else t.narrow(axis, 0, length)

        args = tuple(_float_copy(head(a, axis), True) for a, axis in zip(call.args, arg_axes))
        kwargs = {k: (_float_copy(head(v, kwarg_axes[k]), True) if isinstance(v, torch.Tensor) else v)
                  for k, v in call.kwargs.items() if k != "_state"}
        with torch.enable_grad():
            raw = prepared.reference(*args, **kwargs)  # the method's layout, as dout
            lookup = {**{n: a for n, a in zip(("dq", "dk", "dv") if caps.form == "qkv" else ("dx",), args)},
                      **{f"d{k}": v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}}
            targets = [lookup.get(name, original) for name, original in call.grad_targets]
            dout = head(call.dout, _seq_axis(caps)).float()
            want = torch.autograd.grad(raw, targets, dout, allow_unused=True)
        want = tuple(torch.zeros_like(t) if w is None else w.detach() for w, t in zip(want, targets))
        pairs = []
        for (name, _), got, wanted in zip(call.grad_targets, grads, want):
            axis = target_axes[name]
            pairs.append((name, got if axis is None else gate.Prefixed(got, axis, length), wanted))
        return pairs

    def _own_reference(self, case, caps, prepared, call: Call, bshd: bool, recurrent: bool, rows=None):
        """The method's own reference in fp32 on fp32 copies of the inputs (and its gradients); on the query
        rows ``rows`` only, without gradients, when given."""
        if rows is not None:
            args = tuple(_float_copy(a, False) for a in call.args)
            kwargs = {k: (_float_copy(v, False) if isinstance(v, torch.Tensor) else v)
                      for k, v in call.kwargs.items() if k != "_state"}
            with torch.no_grad():
                out = prepared.reference(*args, rows=rows, **kwargs).detach()
            return (out.transpose(1, 2) if bshd else out), None
        need_grad = case.needs_grad
        args = tuple(_float_copy(a, need_grad) for a in call.args)
        kwargs = {k: (_float_copy(v, need_grad) if isinstance(v, torch.Tensor) else v)
                  for k, v in call.kwargs.items() if k != "_state"}
        with torch.enable_grad() if need_grad else torch.no_grad():
            raw = prepared.reference(*args, **kwargs)  # the method's layout: dout is laid out the same way
            out = raw.transpose(1, 2) if bshd else raw
            grads = None
            if need_grad:
                lookup = {**{n: a for n, a in zip(("dq", "dk", "dv") if caps.form == "qkv" else ("dx",), args)},
                          **{f"d{k}": v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}}
                targets = []
                for name, original in call.grad_targets:
                    targets.append(lookup.get(name, original))  # parameters: the same leaves, cast inside
                dout = call.dout.float()
                grads = torch.autograd.grad(raw, targets, dout, allow_unused=True)
                grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, targets))
                if bshd:
                    grads = tuple(g.transpose(1, 2) if g.dim() == 4 and i < 3 else g for i, g in enumerate(grads))
        return out.detach(), grads

    def _check_step_is_recurrent(self, prepared, call: Call) -> None:
        """A recurrent decode step reads its state and the newest token only: changing older cache entries
        must not move its output (else the 'state' is not what the step uses)."""
        q, k, v = call.args
        state = call.kwargs["_state"]
        step_kwargs = {key: val for key, val in call.kwargs.items() if key != "_state"}
        seq_dim = 2
        if k.shape[seq_dim] < 2:
            return
        k2, v2 = k.detach().clone(), v.detach().clone()
        k2.narrow(seq_dim, 0, k.shape[seq_dim] - 1).mul_(-3.0)
        v2.narrow(seq_dim, 0, v.shape[seq_dim] - 1).mul_(-3.0)
        with torch.no_grad():
            base = prepared.decode.step(state, q, k, v, **step_kwargs).float()
            moved = prepared.decode.step(state, q, k2, v2, **step_kwargs).float()
        if not torch.equal(base, moved):
            raise _Verdict("wrong", "recurrent decode step reads cache entries other than the newest token")

    # ---- memory, phases and rates ------------------------------------------------------------------------------
    def _memory(self, case: Case, prepared, timed, call: Call, resident_bytes: int = 0) -> dict:
        """The allocator's peak while the case's work runs from its inputs (for ``bwd``, the forward whose
        graph the backward needs is included), counted from the case's own tensors: ``peak_mem_mb`` =
        inputs (q, k, v or x, dout, extras, parameters, a decode state) + everything allocated above them +
        ``resident_bytes`` (what the builder allocated and keeps: ``resident_mb``);
        ``mem_above_inputs_mb`` = the part above the inputs. Tensors the harness keeps for other purposes
        (cached reference, L2-flush buffer) are excluded because they exist before and after."""
        if self.device.type != "cuda":
            return {}
        tensors = list(call.args) + [t for t in call.kwargs.values() if isinstance(t, torch.Tensor)]
        input_bytes = sum(tensor_bytes(t) for t in tensors) + tensor_bytes(call.kwargs.get("_state"))
        input_bytes += sum(t.numel() * t.element_size() for _, t in call.grad_targets
                           if not any(t is a for a in tensors))  # parameters
        if case.needs_grad and call.dout is not None:
            input_bytes += tensor_bytes(call.dout)
        self._sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        if case.mode == "bwd":  # the forward's graph is part of what a backward needs
            out = prepared.fn(*call.args, **call.kwargs)
            torch.autograd.grad(out, [t for _, t in call.grad_targets], call.dout)
            del out
        else:
            timed()
        self._sync()
        above = torch.cuda.max_memory_allocated(self.device) - before
        return {"mem_above_inputs_mb": above / 2**20, "resident_mb": resident_bytes / 2**20,
                "peak_mem_mb": (above + input_bytes + resident_bytes) / 2**20}

    def _phases(self, prepared, call: Call, ms_total: float) -> dict:
        """Time each declared phase alone (e.g. routing) and give its share of the whole call."""
        if not prepared.phases:
            return {}
        shares = {}
        for name, phase in prepared.phases.items():
            def run_phase(phase=phase):
                with torch.no_grad():
                    return phase(*call.args, **{k: v for k, v in call.kwargs.items() if k != "_state"})

            result = timers.time_callable(run_phase, self.device, self.timing, allow_graph=False)
            shares[name] = result.ms_median
        main = max(shares, key=shares.get)
        return {"phase_ms": ";".join(f"{k}={v:.4g}" for k, v in shares.items()),
                "routing_share": (shares.get("routing", shares[main]) / ms_total) if ms_total > 0 else None}

    def _rates(self, case: Case, prepared, row: dict, ms: float) -> None:
        seconds = ms * 1e-3
        if prepared.flops is not None:
            from attnbench.record.rows import MODE_FLOP_FACTOR

            row["flops"] = float(prepared.flops) * MODE_FLOP_FACTOR[case.mode]
        row["tflops"] = row["flops"] / seconds / 1e12
        row["gbps"] = row["bytes_moved"] / seconds / 1e9
        if row.get("attended_pairs") is not None:
            from attnbench.record.rows import MODE_FLOP_FACTOR

            attended = 4.0 * row["attended_pairs"] * case.head_dim * MODE_FLOP_FACTOR[case.mode]
            row["tflops_attended"] = attended / seconds / 1e12
        flags = [f for f in (row.get("flags") or "").split(";") if f]
        # an approximate method's tflops is attention-equivalent (the exact work over its time): above the
        # peak is its point, not an impossibility; its attended-pair rate is what the peak bounds
        if self.peak_tflops and row["tflops"] > self.peak_tflops and row.get("exact") is not False:
            flags.append(f"tflops_above_peak({self.peak_tflops:.0f})")
        if self.peak_tflops and (row.get("tflops_attended") or 0) > self.peak_tflops:
            flags.append(f"tflops_attended_above_peak({self.peak_tflops:.0f})")
        if self.peak_gbps and row["gbps"] > self.peak_gbps:
            flags.append(f"gbps_above_peak({self.peak_gbps:.0f})")
        if self.timing.get("cuda_graph") and case.mode not in ("fwd", "decode") and self.device.type == "cuda":
            flags.append("cuda_graph_fwd_only")
        row["flags"] = ";".join(flags) or None

    # ---- pieces ----------------------------------------------------------------------------------------------
    def _leak(self, prepared, call: Call, bound, bshd: bool) -> str | None:
        """Does an approximate method respect its mask? (CAB's lesson: test it, don't trust the declaration.)
        Replace the keys and values that the first queries (up to ``LEAK_PROBE_QUERIES``, at most half) cannot
        see; their outputs must not move by more than two identical calls differ (random-feature methods may
        redraw). The reason of a leak, or None. Exact methods need no probe: the gate against the reference
        already sees a leak."""
        q, k, v = call.args
        fn = prepared.fn
        kwargs = call.kwargs
        rows = max(1, min(LEAK_PROBE_QUERIES, bound.seq_q // 2))  # at most half: a causal mask hides the rest
        hidden = ~bound.dense_rows(0, rows, self.device).any(dim=0)
        if not bool(hidden.any()):
            return None
        seq_dim = 1 if bshd else 2
        index = [slice(None)] * 4
        index[seq_dim] = hidden
        generator = torch.Generator(device=self.device).manual_seed(1234)
        k2, v2 = k.detach().clone(), v.detach().clone()
        for t in (k2, v2):
            shape = list(t.shape)
            shape[seq_dim] = int(hidden.sum())  # the hidden part's shape, read without copying that part
            t[tuple(index)] = torch.randn(shape, generator=generator, device=self.device, dtype=t.dtype) * 3.0
        first = [slice(None)] * 4
        first[seq_dim] = slice(0, rows)
        with torch.no_grad():
            base = fn(q.detach(), k.detach(), v.detach(), **kwargs)[tuple(first)].float()
            again = fn(q.detach(), k.detach(), v.detach(), **kwargs)[tuple(first)].float()
            moved = fn(q.detach(), k2, v2, **kwargs)[tuple(first)].float()
        noise = float((again - base).abs().max())
        delta = float((moved - base).abs().max())
        scale = float(base.abs().max()) or 1.0
        if delta > max(4.0 * noise, 1e-3 * scale):
            return (f"mask leak: the outputs of queries 0..{rows - 1} moved by {delta:.3g} (run-to-run {noise:.3g}) "
                    f"when only keys and values they cannot see changed")
        return None

    def _allocated(self) -> int | None:
        """Bytes the CUDA allocator holds now (None off CUDA)."""
        if self.device.type != "cuda":
            return None
        self._sync()
        return torch.cuda.memory_allocated(self.device)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def _no_recompile(self, compiled: bool):
        """While timing a compiled method, a recompile or an unfused fallback is an error, never a slow row."""
        if not compiled:
            yield
            return
        import torch._dynamo

        with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*without torch.compile.*")
            yield

    def _telemetry(self, call, ms_median: float) -> dict:
        """Back-to-back calls for ~energy_window_ms: energy per call, mean power, SM clock, temperature."""
        if self.telemetry is None:
            return {}
        window_ms = float(self.options.get("energy_window_ms", 250.0))
        calls = max(1, int(window_ms / max(ms_median, 1e-3)))
        self._sync()
        before = self.telemetry.read()
        for _ in range(calls):
            call()
        self._sync()
        after = self.telemetry.read()
        out = {"sm_clock_mhz": after.sm_clock_mhz, "temp_c": after.temp_c, "power_w": after.power_w}
        if before.energy_mj is not None and after.energy_mj is not None and after.energy_mj > before.energy_mj:
            joules = (after.energy_mj - before.energy_mj) / 1e3
            power = joules / max(after.t - before.t, 1e-9)
            # the energy counter ticks coarsely: a window that implies more than the board's limit is a
            # misreading, so energy stays unmeasured rather than wrong
            if self.power_limit_w is None or power <= 1.1 * self.power_limit_w:
                out["energy_mj"] = joules * 1e3 / calls
                out["power_w"] = power
        return out

    def _unsupported(self, row, reason, started):
        return self._finish(row, "unsupported", reason, started)

    def _finish(self, row, status, reason, started):
        row["status"], row["reason"] = status, reason
        row["wall_s"] = time.perf_counter() - started
        self._set_phase("idle")
        return row


def _add_flag(flags: str | None, flag: str) -> str:
    return ";".join([f for f in (flags or "").split(";") if f] + [flag])


def _seq_axis(caps) -> int:
    """The sequence axis of the method's inputs and dout: 1 for ``bshd`` and layers ([B, L, width]), else 2."""
    return 1 if caps.form == "layer" or caps.input_layout == "bshd" else 2


def _zero_after(dout: torch.Tensor, axis: int, length: int) -> torch.Tensor:
    """A copy of ``dout`` that is 0 from position ``length`` on along ``axis``."""
    masked = dout.detach().clone()
    masked.narrow(axis, length, dout.shape[axis] - length).zero_()
    return masked


def _token_axis(t: torch.Tensor, length: int, axis: int) -> int | None:
    """The sequence axis of ``t`` in the method's layout: ``axis`` when that is the only axis of ``length``
    entries; None when none is (not per token: whole, as a parameter or a feature draw); ValueError when
    another axis has ``length`` entries (where the tokens lie is not clear, so it cannot be cut)."""
    hits = [i for i, size in enumerate(t.shape) if size == length]
    if not hits:
        return None
    if hits == [axis]:
        return axis
    raise ValueError(f"token axis of a {tuple(t.shape)} input unclear")


def _token_axes(call: Call, length: int, axis: int) -> tuple[list, dict, dict]:
    """(axes of ``call.args``, of the tensor keyword arguments, of the gradient targets by name) for the prefix
    gate (``_token_axis``, None: whole); ValueError naming the input whose token axis is unclear, or a parameter
    with a token axis (the reference uses the same parameter tensors: they cannot be cut)."""
    def find(name, t):
        try:
            return _token_axis(t, length, axis)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None

    arg_axes = [find(name, a) for name, a in zip(("q", "k", "v") if len(call.args) == 3 else ("x",), call.args)]
    kwarg_axes = {k: find(k, v) for k, v in call.kwargs.items() if k != "_state" and isinstance(v, torch.Tensor)}
    by_tensor = {id(a): ax for a, ax in zip(call.args, arg_axes)}
    by_tensor.update({id(call.kwargs[k]): ax for k, ax in kwarg_axes.items()})
    target_axes = {}
    for name, t in call.grad_targets:
        if id(t) in by_tensor:
            target_axes[name] = by_tensor[id(t)]
        elif find(name, t) is not None:
            raise ValueError(f"{name}: a parameter with a token axis")
        else:
            target_axes[name] = None
    return arg_axes, kwarg_axes, target_axes


def _sampled_reference(q, k, v, bound, rows: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """fp32 reference outputs of the query rows ``rows`` only (each row is independent of the others)."""
    from attnbench.methods.exact.reference import attend_rows

    return attend_rows(q, k, v, bound, rows, chunk_bytes=chunk_bytes)
