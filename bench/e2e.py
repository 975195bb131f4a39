"""End-to-end decoding throughput: specdec plain and speculative against transformers.

    python bench/e2e.py --shape tiny                   # CPU smoke run (seconds)
    python bench/e2e.py --pair demo --skip-hf          # the embedded demo pair
    python bench/e2e.py --shape llama-3.2-1b           # on a GPU: the real sizes

The same as ``specdec bench`` (``PYTHONPATH=.`` where specdec is not installed); the
logic, the options and the formulas live in ``specdec/benchmark.py``.
"""

from specdec.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
