"""`g2tr bench`: the SHAPES.md workloads, the published G2TR structure, peers, timing and reports.

    g2tr bench                         # S1 S2 M1 M2 on every usable backend, tables on stdout
    g2tr bench --workloads M1 --out d  # also d/bench.md, d/bench.json, d/bench.png

Modules: workloads (shapes and inputs), published (the authors' structure as a baseline),
peers (FAISS, torch.topk/sort, scatter_reduce, ToMe), runner (timing, memory, errors),
costs (GPU cost estimate), report (markdown, JSON, charts).
"""
