"""Evaluation: synthetic benchmarks of fictional entities (:mod:`.synthetic`), answer metrics (:mod:`.metrics`),
both pure Python (no torch), cheap to import; the ``lag eval`` harness (:mod:`.harness`: every mode on the
pipeline's own prompts, batched, resumable) and its report (:mod:`.report`: tables and plots, a pure function
of ``results.json``)."""
