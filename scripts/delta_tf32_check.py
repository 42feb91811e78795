"""How much do tf32 dots in the delta rules' Triton state loop (methods/linear/delta_triton.py, its default
``dot_precision``) cost in accuracy? Emulated on the CPU: the PyTorch chunk loop with the operands of its two
matmuls per chunk rounded to tf32 (10 mantissa bits, round to nearest), as the kernel's tl.dot does on tensor
cores, against the fp32 chunked form with half the chunk (the methods' reference above the token loop's length);
relative L2 error of the outputs (the correctness gate's measure; bf16's gate is 8e-3). Forward only.
    python scripts/delta_tf32_check.py > results/cpu-delta-tf32-check/output.txt
"""
import torch
import torch.nn.functional as F
from attnbench.methods.linear import gated_delta as G
torch.manual_seed(0)
def tf32(x):  # round to nearest, 10 explicit mantissa bits
    i = x.contiguous().view(torch.int32)
    i = (i + 0x1000) & ~0x1FFF
    return i.view(torch.float32)
def loop_tf32(U, W, kd, last, state0):
    B,H,N = U.shape[:3]
    states = state0.new_empty(B,H,N,*state0.shape[-2:]); S = state0
    for c in range(N):
        states[:,:,c] = S
        new = U[:,:,c] if W is None else U[:,:,c] - tf32(W[:,:,c]) @ tf32(S)
        S = last[:,:,c,None,None]*S + tf32(kd[:,:,c]).transpose(-1,-2) @ tf32(new)
    return states, S
L, H, d = 8192, 2, 128  # bf16 inputs; the outputs come back in bf16 (both forms)
q,k,v = (torch.randn(1,H,L,d).bfloat16() for _ in range(3))
g = F.logsigmoid(torch.randn(1,H,L)); beta = torch.rand(1,H,L)
with torch.no_grad():
  for name,(gated,delta,norm) in G.VARIANTS.items():
    ref = G.chunked(q,k,v,g,beta,gated=gated,delta=delta,normalize=norm,chunk=32).float()
    fp = G.chunked(q,k,v,g,beta,gated=gated,delta=delta,normalize=norm,chunk=64).float()
    t = G.chunked(q,k,v,g,beta,gated=gated,delta=delta,normalize=norm,chunk=64,states_fn=loop_tf32).float()
    rel = lambda a: ((a-ref).norm()/ref.norm()).item()
    print(name, 'fp32 loop', f"{rel(fp):.2e}", 'tf32 loop', f"{rel(t):.2e}")
print('--- growth, delta_rule, 1 head')
for L in (2048, 8192, 32768):
    torch.manual_seed(1)
    q,k,v = (torch.randn(1,1,L,d).bfloat16() for _ in range(3)); beta = torch.rand(1,1,L)
    with torch.no_grad():
        ref = G.chunked(q,k,v,None,beta,gated=False,delta=True,normalize=True,chunk=64).float()
        t = G.chunked(q,k,v,None,beta,gated=False,delta=True,normalize=True,chunk=64,states_fn=loop_tf32).float()
    print(L, f"{((t-ref).norm()/ref.norm()).item():.2e}")
