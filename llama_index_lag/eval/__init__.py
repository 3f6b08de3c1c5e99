"""Evaluation: synthetic benchmarks of fictional entities (:mod:`.synthetic`) and answer metrics
(:mod:`.metrics`). Both are pure Python (no torch), cheap to import."""
