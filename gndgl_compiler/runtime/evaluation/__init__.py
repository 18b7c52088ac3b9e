"""After training: test accuracy of a run (evaluate_run) and the inference network (load_run)."""
