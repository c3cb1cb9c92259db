"""Entry point: `python -m chatbench ...` (bench/run sets PYTHONPATH=bench)."""

from chatbench.cli import main

# Guarded: worker processes are started with "spawn", which imports the main module again.
if __name__ == "__main__":
    raise SystemExit(main())
