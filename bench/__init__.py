"""Benchmarks for prefixattn: attention microbenchmarks, a training-step benchmark and a
mixed-task prefix-bank benchmark.

Run everything with ``python -m bench --out DIR`` from a checkout with the project installed
(``bench/__main__.py`` lists the commands). The library never imports this package.
Results: one JSON (schema in ``bench/report.py``), one markdown table and a few PNG figures.
Numbers measured on a CPU only prove the harness runs; they are labelled as such and are never
kernel speed.
"""
