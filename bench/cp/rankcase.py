"""One CP case on one rank of a gang: inputs, shards, the layout, the gate, memory and timing.

Every rank makes the same global inputs as a single-device case (same seed, same generator: the shapes
and values of ``CaseRunner.inputs``), keeps its shard, and runs the layout. The gate is the single-device
gate: output and gradients against the float32 reference, tolerance 2 x the same-dtype reference's error
plus the floor. The reference is computed by the gang itself, each rank taking a contiguous slice of the
query rows (key/value gradients summed over ranks), so it costs 1/W of a single device's. Errors are global
norms (partial sums reduced over ranks). Timing: a barrier before each repetition, then each rank times
its own call (CUDA events, or perf_counter on CPU); the row gets each repetition's slowest rank (the step
time) and each rank's median (``ms_rank_*``, ``imbalance``).
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time

import torch
import torch.distributed as dist

from attnbench import masks
from attnbench.config.plan import Case
from attnbench.execute.case import CaseRunner, _compiler_config_restored
from attnbench.measure.gate import tolerances
from attnbench.measure import timing as timers
from attnbench.methods.exact.reference import reference_attention
from attnbench.record.rows import describe

from . import layouts
from .kernels import KERNEL_OF_METHOD
from .tiles import RowSlice


class CPVerdict(Exception):
    """A verdict reached on every rank alike (unsupported, wrong): the gang stays usable."""

    def __init__(self, status: str, reason: str):
        self.status, self.reason = status, reason
        super().__init__(reason)


def _gather_objects(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class RankRunner:
    def __init__(self, rank: int, world: int, device: str, options: dict):
        self.rank, self.world = rank, world
        self.base = CaseRunner(device, options)
        self.device = self.base.device
        self.options = options
        self.phase_hook = None
        self._reference = None

    @property
    def device_name(self) -> str:
        return self.base.device_name

    def _phase(self, phase: str) -> None:
        self.base.phase = phase
        if self.phase_hook is not None:
            self.phase_hook(phase)

    @property
    def phase(self) -> str:
        return self.base.phase

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _barrier(self):
        token = torch.zeros(1, device=self.device)
        dist.all_reduce(token)
        self._sync()

    # ---- the reference, split over the gang ----------------------------------------------------------
    def reference(self, case: Case, inputs, bound, need_grad: bool):
        key = (inputs.key, need_grad)
        if self._reference is not None and self._reference[0] == key:
            return self._reference[1]
        self._reference = None
        seq = case.seq_q
        edges = [seq * r // self.world for r in range(self.world + 1)]
        start, end = edges[self.rank], edges[self.rank + 1]
        chunk = self.options.get("ref_chunk_bytes", 1 << 29)
        rows = RowSlice(bound, start, end)
        q_rows = inputs.q[:, :, start:end]
        dout = inputs.dout[:, :, start:end] if need_grad else None
        out32, grads32 = reference_attention(q_rows, inputs.k, inputs.v, rows, dout=dout, chunk_bytes=chunk)
        visible = (bound.row_counts() > 0).to(self.device)
        if need_grad:  # each rank's rows contribute to every key's gradient: sum them over the ranks
            dk32, dv32 = grads32[1].contiguous(), grads32[2].contiguous()
            for t in (dk32, dv32):
                dist.all_reduce(t)
        out_full = self._gather_rows(out32, edges)
        grads = None
        if need_grad:
            grads = (self._gather_rows(grads32[0], edges), dk32, dv32)
        result = (out_full, grads, visible)
        self._reference = (key, result)
        return result

    def _gather_rows(self, rows: torch.Tensor, edges: list[int]) -> torch.Tensor:
        longest = max(b - a for a, b in zip(edges[:-1], edges[1:]))
        padded = torch.nn.functional.pad(rows, (0, 0, 0, longest - rows.shape[2])).contiguous()
        out = torch.empty(self.world * padded.numel(), dtype=padded.dtype, device=padded.device)
        dist.all_gather_into_tensor(out, padded.flatten())
        out = out.view((self.world,) + padded.shape)
        return torch.cat([out[r, :, :, : edges[r + 1] - edges[r]] for r in range(self.world)], dim=2)

    # ---- the case --------------------------------------------------------------------------------------
    def run(self, case: Case, run_id: str = "") -> dict | None:
        """The row (on rank 0; None on the others) of a case that reached a verdict; exceptions propagate."""
        with _compiler_config_restored():
            try:
                row = self._run(case, run_id)
            except CPVerdict as verdict:
                row = describe(case, run_id, self.device_name)
                row.update(status=verdict.status, reason=verdict.reason)
            self._phase("idle")
            return row if self.rank == 0 else None

    def _agree(self, reason: str | None) -> str | None:
        """The first rank's reason when any rank has one (every rank reaches the same verdict)."""
        reasons = _gather_objects(reason)
        return next((f"{r}" for r in reasons if r), None)

    def _run(self, case: Case, run_id: str) -> dict:
        started = time.perf_counter()
        self._phase("inputs")
        spec = layouts.parse_layout(case.layout)
        bound = masks.make_mask(case.mask).bind(case.seq_q, case.seq_kv)
        reason = None
        try:
            shards = layouts.shards_for(spec, case, bound)
        except layouts.LayoutUnsupported as exc:
            reason = str(exc)
        reason = self._agree(reason)
        if reason:
            raise CPVerdict("unsupported", reason)
        ctx = layouts.CPContext(case=case, spec=spec, bound=bound, device=self.device, rank=self.rank,
                                world=self.world, shards=shards, options=self.options)
        self._phase("build")
        t0 = time.perf_counter()
        reason = None
        try:
            built = layouts.build(ctx)
        except layouts.LayoutUnsupported as exc:
            reason, built = str(exc), None
        reason = self._agree(reason)
        if reason:
            raise CPVerdict("unsupported", reason)

        inputs = self.base.inputs(case)
        need_grad = case.needs_grad
        positions = shards[self.rank].positions(self.device)

        def local(t):
            return t.detach().index_select(2, positions).contiguous().requires_grad_(need_grad)

        q, k, v = local(inputs.q), local(inputs.k), local(inputs.v)
        dout = inputs.dout.index_select(2, positions).contiguous()
        own = self._own_inputs(case, built, positions) if built.prepared is not None else None
        kwargs, extra_leaves = (own[1], own[2]) if own else ({}, [])
        fn = (lambda q_, k_, v_: built.fn(q_, k_, v_, **kwargs)) if own else built.fn
        log = ctx.log
        with built.context():
            call, first = self._closures(case.mode, fn, (q, k, v, *(t for _, t in extra_leaves)), dout, log)
            self._phase("first call")
            log.reset()
            out, grads = first()
            self._sync()
            compile_s = time.perf_counter() - t0
            comm_bytes = log.sent["bwd"] if case.mode == "bwd" else log.total

            self._phase("correctness")
            if own is None:
                ref_out, ref_grads, visible = self.reference(case, inputs, bound, need_grad)
                mine = visible.index_select(0, positions)
                grad_names = ["dq", "dk", "dv"]
            else:  # an approximate method: its own reference over the whole sequence, every row
                ref_out, ref_grads = self._own_reference(case, built.prepared, own[0], need_grad)
                mine = torch.ones(len(positions), dtype=torch.bool, device=self.device)
                grad_names = ["dq", "dk", "dv", *(name for name, _ in extra_leaves)]
                ref_grads = None if ref_grads is None else [ref_grads[name] for name in grad_names]
            pairs = [(out[:, :, mine], ref_out.index_select(2, positions)[:, :, mine])]
            names = ["out"]
            if grads is not None:
                pairs += [(g, r.index_select(2, positions)) for g, r in zip(grads, ref_grads)]
                names += grad_names
            sums = []
            for got, want in pairs:
                sums += [float(((got.float() - want.float()) ** 2).sum()), float((want.float() ** 2).sum())]
            sums = _all_sum(sums, self.device)
            errors = [math.sqrt(sums[i]) / math.sqrt(sums[i + 1]) if sums[i + 1] > 0 else math.sqrt(sums[i])
                      for i in range(0, len(sums), 2)]
            del out, grads, pairs
            out_tol, grad_tol = tolerances(case.dtype, self.options.get("tolerance"))  # the single-device rule
            tols = [out_tol] + [grad_tol] * (len(errors) - 1)
            ratios = [e / t for e, t in zip(errors, tols)]
            worst_index = max(range(len(ratios)), key=lambda i: ratios[i]) if errors else 0
            tolerance = tols[worst_index]
            row = describe(case, run_id, self.device_name)
            finite = all(math.isfinite(e) for e in errors)
            row.update(rel_err=max(errors) if finite else math.nan, err_tol=tolerance, compile_s=None,
                       cp_balance=spec.balance, cp_kernel=self._kernel_name(case, spec))
            if not finite:
                bad = [n for n, e in zip(names, errors) if not math.isfinite(e)]
                return self._finish(row, "wrong", f"non-finite values in {', '.join(bad)}", started)
            if ratios[worst_index] > 1.0:
                worst = names[worst_index]
                return self._finish(row, "wrong", f"{worst} rel_err {errors[worst_index]:.3g} > tolerance {tolerance:.3g} "
                                    f"({case.dtype}); {case.layout} on {self.world} ranks disagrees with one device",
                                    started)

            self._phase("memory")
            memory = self._memory(call, sum(t.numel() * t.element_size() for t in (q, k, v)))
            self._phase("timing")
            samples = self._time(call)

        gathered = _gather_objects({"samples": samples, "memory": memory, "compile_s": compile_s,
                                    "comm_bytes": comm_bytes, "pairs": built.visible_pairs})
        per_rank = [statistics.median(g["samples"]) for g in gathered]
        steps = [max(g["samples"][i] for g in gathered) for i in range(len(samples))]
        result = timers.summarize(steps, "cuda_events" if self.device.type == "cuda" else "perf_counter")
        mean = statistics.fmean(per_rank)
        row.update(
            ms_median=result.ms_median, ms_p20=result.ms_p20, ms_p80=result.ms_p80, ms_min=result.ms_min,
            reps=result.reps, timer=result.timer, compile_s=max(g["compile_s"] for g in gathered),
            ms_rank_max=max(per_rank), ms_rank_mean=mean, imbalance=max(per_rank) / mean if mean > 0 else None,
            rank_ms=";".join(f"{t:.4g}" for t in per_rank),
            comm_bytes=float(max(g["comm_bytes"] for g in gathered)) if spec.name != "torch_cp" else None,
        )
        if row["comm_bytes"] is not None and result.ms_median > 0:  # torch_cp: torch's traffic is not counted here
            row["comm_gbps"] = row["comm_bytes"] / (result.ms_median * 1e-3) / 1e9
        peaks = [g["memory"].get("peak_mem_mb") for g in gathered if g["memory"]]
        if peaks:
            row["peak_mem_mb"] = max(peaks)
            row["mem_above_inputs_mb"] = max(g["memory"]["mem_above_inputs_mb"] for g in gathered)
        row["tflops"] = row["flops"] / (result.ms_median * 1e-3) / 1e12
        row["gbps"] = row["bytes_moved"] / (result.ms_median * 1e-3) / 1e9
        flags = []
        peak = self.base.peak_tflops
        if peak and row["tflops"] > peak * self.world:
            flags.append(f"tflops_above_peak({peak * self.world:.0f} for {self.world} devices)")
        row["flags"] = ";".join(flags) or None
        return self._finish(row, "ok", None, started)

    def _own_inputs(self, case: Case, built, positions):
        """The method's global call (the single-device inputs, extras and ``prepare`` output, as the
        single-device runner makes them), this rank's keyword arguments (token extras sharded, the rest
        whole) and its extra gradient leaves ``[(name, tensor)]``."""
        from attnbench.methods import METHODS

        call = self.base._call(case, METHODS[case.method].caps, built.prepared, False)
        kwargs, leaves = {}, []
        for name, value in call.kwargs.items():
            if name in built.token_extras:
                value = value.detach().index_select(2, positions).contiguous().requires_grad_(value.requires_grad)
                if value.requires_grad:
                    leaves.append((f"d{name}", value))
            kwargs[name] = value
        return call, kwargs, leaves

    def _own_reference(self, case: Case, prepared, call, need_grad: bool):
        """The method's own fp32 reference on the whole sequence (every rank computes it: the methods that
        take this path are linear in the length) and its gradients by name."""
        from attnbench.methods import METHODS

        caps = METHODS[case.method].caps
        out, grads = self.base._own_reference(case, caps, prepared, call, caps.input_layout == "bshd", False)
        if not need_grad:
            return out, None
        return out, {name: g for (name, _), g in zip(call.grad_targets, grads)}

    @staticmethod
    def _kernel_name(case, spec) -> str:
        if spec.name in ("ulysses", "state_pass"):
            return case.method
        if spec.name == "torch_cp":
            return f"torch {case.method}"
        return KERNEL_OF_METHOD.get(case.method, "?")

    def _finish(self, row, status, reason, started):
        row["status"], row["reason"] = status, reason
        row["wall_s"] = time.perf_counter() - started
        return row

    def _closures(self, mode, fn, leaves, dout, log):
        """``leaves``: (q, k, v, *extra leaves): fn takes q, k, v; gradients of all of them."""
        q, k, v = leaves[:3]

        def forward():
            log.phase = "fwd"
            return fn(q, k, v)

        def backward(out, retain=False):
            log.phase = "bwd"
            try:
                return torch.autograd.grad(out, leaves, dout, retain_graph=retain)
            finally:
                log.phase = "fwd"

        if mode == "fwd":
            def call():
                with torch.no_grad():
                    return forward()

            return call, lambda: (call(), None)
        if mode == "bwd":
            holder = {}

            def first():
                holder["out"] = forward()
                log.reset()  # the timed call is the backward alone
                return holder["out"].detach(), backward(holder["out"], retain=True)

            return (lambda: backward(holder["out"], retain=True)), first

        def call():
            out = forward()
            return out, backward(out)

        def first():
            out, grads = call()
            return out.detach(), grads

        return call, first

    def _memory(self, call, input_bytes: int) -> dict:
        if self.device.type != "cuda":
            return {}
        self._barrier()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        call()
        self._sync()
        above = torch.cuda.max_memory_allocated(self.device) - before
        return {"mem_above_inputs_mb": above / 2**20, "peak_mem_mb": (above + input_bytes) / 2**20}

    def _time(self, call) -> list[float]:
        """Per-repetition times of this rank, ms; every rank runs the same count, a barrier before each."""
        timing = self.options["timing"]
        cuda = self.device.type == "cuda"
        self._barrier()
        t0 = time.perf_counter()
        call()
        self._sync()
        estimate = (time.perf_counter() - t0) * 1e3
        deadline = time.perf_counter() + timing["warmup_ms"] / 1e3
        warm = torch.tensor([1.0 if time.perf_counter() < deadline else 0.0], device=self.device)
        while True:  # warm up together until every rank's warm-up time is over
            dist.all_reduce(warm, op=dist.ReduceOp.MAX)
            if warm.item() == 0.0:
                break
            call()
            self._sync()
            warm.fill_(1.0 if time.perf_counter() < deadline else 0.0)
        est = torch.tensor([estimate], device=self.device)
        dist.all_reduce(est, op=dist.ReduceOp.MAX)
        reps = timers._reps_for(float(est.item()), timing)
        flush = timers.flush_buffer(self.device) if cuda and timing.get("flush_l2", True) else None
        samples = []
        for _ in range(reps):
            self._barrier()
            if cuda:
                if flush is not None:
                    flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                call()
                samples.append((time.perf_counter() - t0) * 1e3)
        return samples


@contextlib.contextmanager
def process_group(backend: str, rank: int, world: int, port: int, timeout_s: float = 600.0):
    """A process group over TCP on this host, destroyed on exit."""
    import datetime

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()
