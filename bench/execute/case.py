"""One case, measured: build, first call (compile), correctness gate, memory, timing, telemetry.

``CaseRunner.run(case)`` returns a row (dict, bench.schema columns) for a case that ran to a verdict
(``ok``, ``wrong`` or ``unsupported``); failures (exceptions, OOM) propagate to the worker, which makes
their rows and replaces itself. Inputs and the fp32 reference are cached for the last input key, so the
methods of one shape share them (the planner orders cases that way).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass

import torch

from attnbench import masks
from attnbench.methods import METHODS, BuildContext, Unsupported
from attnbench.methods.exact.reference import reference_attention

from attnbench.measure import timing as timers
from attnbench.config.plan import Case
from attnbench.record.rows import describe

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# approximate methods: queries whose hidden keys the leak probe perturbs
LEAK_PROBE_QUERIES = 64
# the gate's floor, added to 2 x the same-dtype reference's error
ERROR_FLOOR = {"float32": 5e-5, "float16": 1e-3, "bfloat16": 2e-3}
# dense bf16/fp16 datasheet peaks: a row above its device's peak is flagged as impossible
DATASHEET_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "B200": 2250.0}
# HBM datasheet bandwidth, GB/s: bytes_moved is a floor, so a row above it read from a cache (or is wrong)
DATASHEET_GBPS = {"H100": 3350.0, "H200": 4800.0, "H800": 3350.0, "A100": 2039.0, "B200": 8000.0}


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach(), ref.detach()
    diff = torch.linalg.vector_norm((got.float() - ref.float()).flatten())
    denom = torch.linalg.vector_norm(ref.float().flatten())
    return float(diff / denom) if float(denom) > 0 else float(diff)


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
    out: torch.Tensor
    grads: tuple | None
    same_dtype_err: float  # max over out (and grads) of the working-dtype reference's error
    rows_visible: torch.Tensor  # bool [seq_q]: rows with at least one visible key


@contextlib.contextmanager
def _compiler_config_restored():
    """Snapshot dynamo's and AOTAutograd's settings and put them back, so no case changes a later one."""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    saved = [(module, module.save_config()) for module in (dynamo_config, functorch_config)]
    try:
        yield
    finally:
        with warnings.catch_warnings():  # restoring deprecated no-op keys warns; nothing to report
            warnings.simplefilter("ignore", FutureWarning)
            for module, state in saved:
                module.load_config(state)


class CaseRunner:
    def __init__(self, device: str, options: dict):
        self.device = torch.device(device)
        self.options = options
        self.timing = options["timing"]
        self.phase = "idle"
        self.phase_hook = None  # called with each new phase (the worker reports it to the parent)
        self._inputs: Inputs | None = None
        self._reference: Reference | None = None
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

    # ---- inputs and reference ----------------------------------------------------------------------------
    def inputs(self, case: Case) -> Inputs:
        key = case.input_key()
        if self._inputs is not None and self._inputs.key == key:
            return self._inputs
        self._inputs = self._reference = None
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

    def reference(self, case: Case, inputs: Inputs, bound, need_grad: bool) -> Reference:
        cached = self._reference
        if cached is not None and cached.key == inputs.key and (cached.grads is not None or not need_grad):
            return cached
        chunk = self.options.get("ref_chunk_bytes", 1 << 29)
        dout = inputs.dout if need_grad else None
        out32, grads32 = reference_attention(inputs.q, inputs.k, inputs.v, bound, dout=dout, chunk_bytes=chunk)
        out_lp, grads_lp = reference_attention(
            inputs.q, inputs.k, inputs.v, bound, compute_dtype=TORCH_DTYPES[case.dtype], dout=dout,
            chunk_bytes=chunk,
        )
        rows_visible = (bound.row_counts() > 0).to(self.device)
        errs = [rel_error(out_lp[:, :, rows_visible], out32[:, :, rows_visible])]
        if need_grad:
            errs += [rel_error(a, b) for a, b in zip(grads_lp, grads32)]
        del out_lp, grads_lp
        self._reference = Reference(inputs.key, out32, grads32, max(errs), rows_visible)
        return self._reference

    # ---- the case ------------------------------------------------------------------------------------------
    def run(self, case: Case, run_id: str = "") -> dict:
        """Measure ``case``; compiler settings a builder changes are restored afterwards (DESIGN.md §7)."""
        with _compiler_config_restored():
            return self._run(case, run_id)

    def _run(self, case: Case, run_id: str) -> dict:
        started = time.perf_counter()
        self._set_phase("inputs")
        spec = masks.make_mask(case.mask)
        bound = spec.bind(case.seq_q, case.seq_kv).to(self.device)
        row = describe(case, run_id, self.device_name)
        method = METHODS[case.method]
        caps = method.caps
        inputs = self.inputs(case)
        need_grad = case.needs_grad
        bshd = caps.input_layout == "bshd"

        def laid_out(t):  # the method's layout, as fresh leaves (made outside the timed region)
            t = t.detach()
            t = t.transpose(1, 2).contiguous() if bshd else t
            return t.requires_grad_(need_grad)

        q, k, v = laid_out(inputs.q), laid_out(inputs.k), laid_out(inputs.v)
        dout = inputs.dout.transpose(1, 2).contiguous() if bshd else inputs.dout

        self._set_phase("build")
        t0 = time.perf_counter()
        ctx = BuildContext(case=case, mask=bound, device=self.device, dtype=TORCH_DTYPES[case.dtype],
                           options=self.options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fn = method.build(ctx)
                self._set_phase("first call")
                call, first = self._closures(case.mode, fn, q, k, v, dout)
                out, grads = first()
                self._sync()
            except Unsupported as exc:
                return self._unsupported(row, str(exc), started)
            except Exception as exc:
                if caps.declines and any(text in str(exc) for text in caps.declines):
                    notes = "; ".join(dict.fromkeys(str(w.message).split("\n")[0] for w in caught))
                    return self._unsupported(row, f"{str(exc).splitlines()[0]} {notes}".strip(), started)
                raise
        row["compile_s"] = time.perf_counter() - t0

        self._set_phase("correctness")
        ref = self.reference(case, inputs, bound, need_grad)
        if bshd:
            out = out.transpose(1, 2)
            grads = None if grads is None else tuple(g.transpose(1, 2) for g in grads)
        got = [out[:, :, ref.rows_visible]]
        want = [ref.out[:, :, ref.rows_visible]]
        names = ["out"]
        if grads is not None:
            got += list(grads)
            want += list(ref.grads)
            names += ["dq", "dk", "dv"]
        errors = [rel_error(g, w) for g, w in zip(got, want)]
        del got, out, grads
        tolerance = 2.0 * ref.same_dtype_err + self.options.get("error_floor", ERROR_FLOOR)[case.dtype]
        row["rel_err"] = max(errors) if all(math.isfinite(e) for e in errors) else math.nan
        row["err_tol"] = tolerance
        bad = [n for n, e in zip(names, errors) if not math.isfinite(e)]
        if bad:
            return self._finish(row, "wrong", f"non-finite values in {', '.join(bad)}", started)
        if caps.exact and row["rel_err"] > tolerance:
            worst = names[errors.index(max(errors))]
            return self._finish(
                row, "wrong",
                f"{worst} rel_err {row['rel_err']:.3g} > tolerance {tolerance:.3g} "
                f"(2 x {case.dtype} reference error {ref.same_dtype_err:.3g} + floor)",
                started,
            )

        if not caps.exact:
            self._set_phase("leak check")
            leak = self._leak(fn, bound, q, k, v, bshd)
            if leak:
                return self._finish(row, "wrong", leak, started)

        self._set_phase("memory")
        row.update(self._memory(call, q, k, v))
        self._set_phase("timing")
        with self._no_recompile(caps.compiled):
            result = timers.time_callable(call, self.device, self.timing, allow_graph=case.mode in ("fwd", "decode"))
            telemetry = self._telemetry(call, result.ms_median)
        row.update(result.columns())  # medians, spread, every repetition's time (ms_samples)
        row.update(telemetry)
        row["tflops"] = row["flops"] / (result.ms_median * 1e-3) / 1e12
        row["gbps"] = row["bytes_moved"] / (result.ms_median * 1e-3) / 1e9
        flags = list(result.flags)  # e.g. cpu_interference(...) from the timer
        if self.peak_tflops and row["tflops"] > self.peak_tflops:
            flags.append(f"tflops_above_peak({self.peak_tflops:.0f})")
        if self.peak_gbps and row["gbps"] > self.peak_gbps:
            flags.append(f"gbps_above_peak({self.peak_gbps:.0f})")
        if self.timing.get("cuda_graph") and case.mode not in ("fwd", "decode") and self.device.type == "cuda":
            flags.append("cuda_graph_fwd_only")
        row["flags"] = ";".join(flags) or None
        return self._finish(row, "ok", None, started)

    # ---- pieces ----------------------------------------------------------------------------------------------
    def _leak(self, fn, bound, q, k, v, bshd: bool) -> str | None:
        """Does an approximate method respect its mask? (CAB's lesson: test it, don't trust the declaration.)
        Replace the keys and values that the first queries (up to ``LEAK_PROBE_QUERIES``, at most half) cannot
        see; their outputs must not move by more than two identical calls differ (random-feature methods may
        redraw). The reason of a leak, or None. Exact methods need no probe: the gate against the reference
        already sees a leak."""
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
            t[tuple(index)] = torch.randn(t[tuple(index)].shape, generator=generator, device=self.device,
                                          dtype=t.dtype) * 3.0
        first = [slice(None)] * 4
        first[seq_dim] = slice(0, rows)
        with torch.no_grad():
            base = fn(q.detach(), k.detach(), v.detach())[tuple(first)].float()
            again = fn(q.detach(), k.detach(), v.detach())[tuple(first)].float()
            moved = fn(q.detach(), k2, v2)[tuple(first)].float()
        noise = float((again - base).abs().max())
        delta = float((moved - base).abs().max())
        scale = float(base.abs().max()) or 1.0
        if delta > max(4.0 * noise, 1e-3 * scale):
            return (f"mask leak: the outputs of queries 0..{rows - 1} moved by {delta:.3g} (run-to-run {noise:.3g}) "
                    f"when only keys and values they cannot see changed")
        return None

    def _closures(self, mode, fn, q, k, v, dout):
        """(timed call, first call returning (out, grads or None)) for a mode."""
        if mode in ("fwd", "decode"):
            def call():
                with torch.no_grad():
                    return fn(q, k, v)

            return call, lambda: (call(), None)
        if mode == "bwd":
            out = fn(q, k, v)

            def call():
                return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

            return call, lambda: (out.detach(), call())

        def call():  # fwd_bwd
            o = fn(q, k, v)
            return o, torch.autograd.grad(o, (q, k, v), dout)

        def first():
            o, grads = call()
            return o.detach(), grads

        return call, first

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

    def _memory(self, call, q, k, v) -> dict:
        if self.device.type != "cuda":
            return {}
        self._sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        call()
        self._sync()
        above = torch.cuda.max_memory_allocated(self.device) - before
        input_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
        return {"mem_above_inputs_mb": above / 2**20, "peak_mem_mb": (above + input_bytes) / 2**20}

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
