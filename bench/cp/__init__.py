"""Context-parallel (CP) layouts: one attention call spread over a gang of processes, one per GPU.

Modules, in data-flow order:

* ``shard`` — load balancing: which token positions each rank holds (``contiguous``, ``zigzag`` head-tail,
  ``per_document`` head-tail inside every document);
* ``tiles`` — each rank's shard of the mask against each KV chunk it meets, derived from the mask spec
  (``BoundMask``): empty tiles are skipped, full and causal tiles run native kernels, others run with the
  shard's own mask (dense for the math kernel, a position-mapped ``mask_mod`` for FlexAttention);
* ``kernels`` — the inner kernel per (query shard, KV chunk), returning the log-sum-exp for the merge;
* ``comm`` — collectives with autograd and a per-rank count of the bytes the algorithm sends;
* ``layouts`` — ``ring``, ``ring_allgather``, ``ulysses``, ``usp``, ``torch_cp`` (and optional adapters);
* ``rankcase`` — one CP case on one rank: inputs, shards, the gate against the fp32 reference, timing;
* ``gang`` — the parent side: a gang of N rank processes per world size, fed CP cases by the runner;
  ``plan`` — the ``layouts`` / ``cp`` / ``cp_balance`` config axes; ``cluster`` — Slurm and submitit.
"""
