"""Benchmarks for prefixattn: attention microbenchmarks, a training-step benchmark and a
mixed-task prefix-bank benchmark.

Run everything with ``python -m bench.run_all --out DIR`` from a checkout (or ``prefixattn bench``).
Results: one JSON (schema in ``bench/report.py``), one markdown table and a few PNG figures.
Numbers measured on a CPU only prove the harness runs; they are labelled as such and are never
kernel speed.
"""
