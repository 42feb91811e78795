"""S4D, the diagonal structured state space (Gu, Gupta, Goel, Ré, NeurIPS 2022, arXiv:2206.11893), layer form.

Per channel c of x ``[B, L, C]`` (C = heads·head_dim), N/2 complex modes with S4D-Lin initialisation
``A_n = −½ + iπn``, step ``Δ_c = exp(log_dt_c)``, ZOH discretisation (B = 1):
``h_t = e^{ΔA} h_{t−1} + (e^{ΔA} − 1)/A · x_t``, ``y_t = 2 Re(Σ_n C_n h_{t,n}) + D x_t``, then an output
projection ``W_o``. Equivalently a causal convolution with the kernel ``K_l = 2 Re Σ_n C_n (e^{ΔA}−1)/A e^{lΔA}``.

Forms: the fast path builds K (Vandermonde) and convolves by FFT, O(L log L) (fp32/complex64); the reference
is the recurrence, a loop over tokens, up to ``reference_loop_max_len`` (default 1024) and above that the FFT
convolution in float64/complex128 (the ``rows=`` form, :func:`s4d_rows`: long cases' sampled tokens, the state
carried over token chunks in float64, memory flat in the length); :func:`s4d_step` is the O(N) per-channel decode
step (tested on the CPU; the harness's decode mode serves q/k/v methods only). Causal only; a different operator
(class N). Hyper-parameters: ``state_size`` (N, even, default 64), ``group`` (channels per FFT group, default
128: the FFT over 2L runs a group of channels at a time, checkpointed with gradients, so its spectra are
group · L, not C · L; a Python loop of C / group steps, see :func:`s4d_conv`).
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ..contract import Prepared
from ..registry import Capabilities, Unsupported, register_method
from .common import mask_mode, param_int


def _modes(params):
    dt = torch.exp(params["log_dt"])  # [C]
    A = torch.complex(-torch.exp(params["log_a_re"]), params["a_im"])  # [C, N/2]
    dtA = dt[:, None] * A
    Cc = torch.complex(params["c_re"], params["c_im"])
    return dtA, Cc * (torch.exp(dtA) - 1) / A  # decay exponent, input-side coefficient C·B̄


KERNEL_BLOCK = 2048  # kernel positions per block: the [C, N/2, block] powers, 1 GiB complex64 at C = 2048, N = 64
GROUP = 128  # channels per FFT group (``method_options.s4d.group``): a group's buffers are group · L, not C · L


def _kernel_block(dtA, coef, start: int, stop: int):
    powers = torch.exp(dtA[..., None] * torch.arange(start, stop, device=dtA.device))  # [C, N/2, stop - start]
    return 2 * torch.einsum("cn,cnl->cl", coef, powers).real


def _kernel(dtA, coef, length: int, block: int = KERNEL_BLOCK):
    """K [C, L] from the modes (``dtA``, ``coef`` [C, N/2] complex), ``block`` positions at a time."""
    if block < 1:
        raise ValueError(f"s4d_kernel: block must be >= 1, got {block}")
    train = torch.is_grad_enabled() and (dtA.requires_grad or coef.requires_grad)
    pieces = []
    for start in range(0, length, block):
        stop = min(start + block, length)
        if train and length > block:
            pieces.append(checkpoint(_kernel_block, dtA, coef, start, stop, use_reentrant=False))
        else:
            pieces.append(_kernel_block(dtA, coef, start, stop))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)  # [C, L]


def s4d_kernel(params, length: int, dtype=torch.complex64, block: int = KERNEL_BLOCK):
    """The convolution kernel ``K`` [C, L], built ``block`` positions at a time: the Vandermonde powers
    ``e^{lΔA}`` [C, N/2, block] live one block at a time (all at once they were C · N/2 · L complex numbers,
    16 GB at 32K tokens, C = 2048, N = 64: s4d's `oom` above 32K in results/h200-linear). With gradients each
    block is checkpointed (its powers recomputed in the backward instead of kept)."""
    dtA, coef = _modes(params)
    return _kernel(dtA.to(dtype), coef.to(dtype), length, block)


def _conv_group(x, dtA, coef, block: int, fault: str | None = None):
    """One channel group: x [B, L, G] real -> y [B, G, L] (contiguous), the causal convolution with the
    group's kernel (``block`` positions at a time) by FFT over 2L. Each spectrum ([G, L + 1] complex) is
    dropped once used."""
    length = x.shape[1]
    n = 2 * length
    spectrum = torch.fft.rfft(_kernel(dtA, coef, length, block), n=n)
    spectrum = torch.fft.rfft(x.transpose(1, 2), n=n) * spectrum
    y = torch.fft.irfft(spectrum, n=n)[..., :length]
    return y if fault == "view" else y.contiguous()  # a view of [B, G, 2L] keeps twice the output alive


def s4d_conv(x, params, *, group: int = GROUP, dtype=torch.complex64, fault: str | None = None):
    """x [B, L, C] real -> y [B, L, C] (the SSM part, before D and W_o), the channels ``group`` at a time.

    The FFT convolution over 2L of all C channels at once held C · L-sized spectra, padded inputs and
    products (several times x's size: s4d's fwd and fwd_bwd `oom` at 1M tokens, C = 2048, on the H200, and the
    float64 gate at 32K); one group's are ``group / C`` of that. With gradients each group runs under a
    checkpoint (its spectra and kernel recomputed in the backward, group by group, not saved) and x and the
    modes are split with ``split`` (one gradient concatenation in the backward, not one full-size zero-padded
    gradient per group). The per-channel operator is unchanged. ``fault``: deliberately broken variants for
    the tests' negative controls (``group >= C``: the form before, all channels at once, not checkpointed;
``"nocheckpoint"``: the groups' buffers saved for the backward; ``"view"``:
    each group's output kept as a view of its 2L-long inverse transform)."""
    if group < 1:
        raise ValueError(f"s4d_conv: group must be >= 1, got {group}")
    dtA, coef = _modes(params)
    dtA, coef = dtA.to(dtype), coef.to(dtype)
    train = torch.is_grad_enabled() and fault != "nocheckpoint" and x.shape[-1] > group and any(
        t.requires_grad for t in (x, dtA, coef))  # one group (the form before): nothing to gain, not recomputed
    # a group's kernel blocks are C / group times longer: the powers [group, N/2, block] are as large as the
    # all-channel form's [C, N/2, KERNEL_BLOCK], and there are as many blocks in all (L / KERNEL_BLOCK)
    block = KERNEL_BLOCK * max(1, x.shape[-1] // group)
    outs = []
    for xg, ag, cg in zip(x.split(group, dim=-1), dtA.split(group), coef.split(group)):
        if train:
            outs.append(checkpoint(_conv_group, xg, ag, cg, block, fault, use_reentrant=False))
        else:
            outs.append(_conv_group(xg, ag, cg, block, fault))
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return y.transpose(1, 2)


def s4d_fft(x, params, *, group: int = GROUP, fault: str | None = None):
    """x [B, L, C] fp32 -> y [B, L, C] (the SSM part, before D and W_o): :func:`s4d_conv` in complex64."""
    return s4d_conv(x, params, group=group, fault=fault)


def s4d_loop(x, params):
    dtA, coef = _modes(params)
    decay = torch.exp(dtA)  # [C, N/2]
    Bbar = (torch.exp(dtA) - 1) / torch.complex(-torch.exp(params["log_a_re"]), params["a_im"])
    Cc = torch.complex(params["c_re"], params["c_im"])
    h = torch.zeros(x.shape[0], *decay.shape, dtype=torch.complex64, device=x.device)
    outs = []
    for t in range(x.shape[1]):
        h = decay * h + Bbar * x[:, t, :, None]
        outs.append(2 * (Cc * h).sum(-1).real)
    return torch.stack(outs, dim=1)


def s4d_fft64(x, params, *, group: int = GROUP):
    """The FFT convolution with the kernel and transforms in float64/complex128 (the reference above the loop
    length: the same algebra as the fast path at twice the precision, channels in groups as
    :func:`s4d_conv`: with gradients (the gate up to ``ref_full_pairs``: 32K and 64K tokens) the groups'
    complex128 buffers are recomputed in the backward, not kept)."""
    y = s4d_conv(x.double(), {k: v.double() for k, v in params.items()}, group=group, dtype=torch.complex128)
    return y.to(x.dtype)


def s4d_rows(x, params, rows, *, chunk: int | None = None, carry: bool = True, budget: int = 1 << 22):
    """The SSM part at tokens ``rows`` only (``[B, len(rows), C]``, ``x``'s dtype), for long cases, in
    float64/complex128 like :func:`s4d_fft64`: the tokens are walked in chunks of ``chunk`` carrying the state
    ``h`` [B, C, N/2] across chunks (``h ← e^{TΔA} h + Σ_j e^{(T−1−j)ΔA} B̄ x_j``, one weight tensor
    [C, N/2, T] made once); a row ``t`` in a chunk starting at ``t0`` reads
    ``2 Re Σ_n C_n e^{(t−t0+1)ΔA} h_n`` plus the kernel convolution over ``t0 .. t``. ``chunk`` defaults to
    ``budget // (C · N/2)`` tokens (the weights stay ~64 MiB); extra memory O(C · N/2 · chunk + B · chunk · C),
    whatever the length; tokens past the last row are not read. ``carry=False`` (every chunk starts from a zero
    state) is a deliberately broken variant for the tests' negative control."""
    p64 = {key: val.double() for key, val in params.items()}
    dtA, coef = _modes(p64)  # complex128 [C, N/2]
    Bbar = (torch.exp(dtA) - 1) / torch.complex(-torch.exp(p64["log_a_re"]), p64["a_im"])
    Cc = torch.complex(p64["c_re"], p64["c_im"])
    width, half = dtA.shape
    if chunk is None:
        chunk = max(1, min(4096, budget // max(1, width * half)))
    if chunk < 1:
        raise ValueError(f"s4d_rows: chunk must be >= 1, got {chunk}")
    rows = rows.to(x.device).long()
    end = int(rows.max()) + 1 if rows.numel() else 0
    steps = torch.arange(chunk, device=x.device, dtype=torch.float64)
    into = Bbar[..., None] * torch.exp(dtA[..., None] * (chunk - 1 - steps))  # [C, N/2, T]: x_j -> h at the end
    across = torch.exp(dtA * chunk)  # [C, N/2]
    kernel = 2 * torch.einsum("cn,cnl->cl", coef, torch.exp(dtA[..., None] * steps)).real  # [C, T]
    out = torch.zeros(x.shape[0], rows.numel(), width, dtype=torch.float64, device=x.device)
    h = torch.zeros(x.shape[0], width, half, dtype=torch.complex128, device=x.device)
    for start in range(0, end, chunk):
        stop = min(start + chunk, end)
        xs = x[:, start:stop].double()  # [B, n, C]
        for i in ((rows >= start) & (rows < stop)).nonzero().squeeze(1).tolist():
            t = int(rows[i]) - start
            conv = torch.einsum("bjc,cj->bc", xs[:, :t + 1], kernel[:, :t + 1].flip(-1))
            prior = 2 * (Cc * torch.exp(dtA * (t + 1)) * h).sum(-1).real
            out[:, i] = conv + prior
        if stop < end:  # only full chunks come before the last one
            add = torch.einsum("cnj,bjc->bcn", into, xs.to(torch.complex128))
            h = across * h + add if carry else add
    return out.to(x.dtype)


def s4d_step(state, x_t, params):
    """Decode: state [B, C, N/2] complex, x_t [B, C] -> (state, y_t) (SSM part)."""
    dtA, _ = _modes(params)
    A = torch.complex(-torch.exp(params["log_a_re"]), params["a_im"])
    state = torch.exp(dtA) * state + ((torch.exp(dtA) - 1) / A) * x_t[..., None]
    return state, 2 * (torch.complex(params["c_re"], params["c_im"]) * state).sum(-1).real


def init_parameters(width: int, state: int, generator, device):
    half = state // 2

    def keep(t):
        return t.requires_grad_(True)

    log_dt = torch.rand(width, generator=generator, device=device) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)
    return {
        "log_dt": keep(log_dt),
        "log_a_re": keep(torch.full((width, half), math.log(0.5), device=device)),
        "a_im": keep(math.pi * torch.arange(half, device=device, dtype=torch.float32).repeat(width, 1)),
        "c_re": keep(torch.randn(width, half, generator=generator, device=device) * math.sqrt(0.5)),
        "c_im": keep(torch.randn(width, half, generator=generator, device=device) * math.sqrt(0.5)),
        "d": keep(torch.randn(width, generator=generator, device=device)),
        "w_o": keep(torch.randn(width, width, generator=generator, device=device) * width ** -0.5),
    }


@register_method("s4d", Capabilities(family="linear", exact=False, form="layer", masks={"causal"}, causal_only=True,
                                      backward=True, trainable=True),
                 options=("state_size", "group", "reference_loop_max_len", "reference_stream_chunk"))
def build_s4d(ctx):
    """S4D layer: diagonal SSM, FFT convolution (fast) vs the token recurrence (reference)."""
    mask_mode(ctx)
    case = ctx.case
    if case.seq_q != case.seq_kv:
        raise Unsupported("s4d is a sequence layer (seq_q == seq_kv)")
    state = param_int(ctx, "state_size", 64, minimum=2, maximum=4096)
    if state % 2:
        raise ValueError(f"method_options.s4d.state_size: must be even (complex-conjugate pairs), got {state}")
    group = param_int(ctx, "group", GROUP)  # channels per FFT group (fast path and the float64 reference)
    loop_max = param_int(ctx, "reference_loop_max_len", 1024)
    stream = param_int(ctx, "reference_stream_chunk", 0, minimum=0)  # 0: sized by s4d_rows's budget
    width = case.heads_q * case.head_dim
    params = init_parameters(width, state, torch.Generator(device=ctx.device).manual_seed(case.seed), ctx.device)
    ssm = {k: v for k, v in params.items() if k not in ("d", "w_o")}

    def head(x, y):
        return (y + params["d"] * x) @ params["w_o"]

    def fast(x):
        xf = x.float()
        return head(xf, s4d_fft(xf, ssm, group=group)).to(x.dtype)

    def reference(x, rows=None):
        if rows is not None:  # a long case's sampled rows, the state carried over token chunks (forward only)
            rows = rows.to(x.device).long()
            return head(x[:, rows], s4d_rows(x, ssm, rows, chunk=stream or None))
        y = s4d_loop(x, ssm) if x.shape[1] <= loop_max else s4d_fft64(x, ssm, group=group)
        return head(x, y)

    length = case.seq_q
    flops = case.batch * (2.0 * length * width * width + 30.0 * width * 2 * length * math.log2(2 * length))
    return Prepared(fn=fast, reference=reference, parameters=list(params.values()), flops=flops,
                    softmax_comparable=False)
