"""Load benchmark of `specdec serve`: concurrency 1, 8, 32, 64 over loopback, speculative
and plain decoding through the same server code, as a markdown table.

    python bench/serve_load.py                          # the embedded demo target and head (CPU: ~2 min)
    python bench/serve_load.py --target DIR --draft DIR --max-tokens 128

(``PYTHONPATH=.`` where specdec is not installed.) The logic and the definitions of the
columns live in ``specdec/server/load.py``.
"""

from specdec.server.load import main

if __name__ == "__main__":
    raise SystemExit(main())
