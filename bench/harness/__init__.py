"""The machinery behind bench/run.py: processes, peers, load, growth, soak, report."""
