"""Runs: the typed run configuration, the training options declared once, resume rules, run directories, preflight
checks, signals, progress events and the final report."""
