"""`dialogtune eval`: generation-based evaluation with standard metrics and reports."""
