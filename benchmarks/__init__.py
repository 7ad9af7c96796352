"""Benchmarks: lazy attention against exact baselines, with the project's targets checked.

``python benchmarks/run.py`` (``--quick`` for a reduced run, ``--tiny`` for a smoke test;
``make bench``) measures

1. seconds per update, per query and per (update + its share of queries) for every strategy
   (on-demand, eager with O(n·d) memory, eager with Ã stored, the lazy engine under each
   policy, full recompute) on three update streams and three query rates;
2. exact query latency with k touched rows pending (single entry, batch of 1,000, whole row);
3. flush efficiency against GEMM of the same shapes and dtype, and ``exp`` throughput;
4. the original prototype's demo workload;
5. peak resident memory (engine at n = 50,000; dashboard ticks), in subprocesses;
6. the dashboard's tick time (model work and plot data, no rendering),

prints readable tables and PASS/MISS per target, and writes every figure with a description
of the machine to JSON, a markdown summary and plots (HTML; PNG when a headless Chromium is
available). How the figures are obtained: ``benchmarks/README.md``.

Modules: :mod:`.plans` (sizes per mode), :mod:`.machine` (what the machine is),
:mod:`.timing` (driving and timing strategies), :mod:`.section` (what a section is: the
extension point), :mod:`.sections` (the registered sections that measure), :mod:`.child`
(measurements in a fresh process), :mod:`.collect` (one run), :mod:`.text` and
:mod:`.report` (markdown, README summary, JSON), :mod:`.plots`, :mod:`.cli` (the command line).
Only the public API of :mod:`dynattn` is used.
"""
