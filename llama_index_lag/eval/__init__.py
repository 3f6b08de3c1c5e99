"""Evaluation: synthetic benchmarks of fictional entities (:mod:`.synthetic`), answer metrics
(:mod:`.metrics`), both pure Python (no torch), cheap to import; the ``lag eval`` harness (:mod:`.harness`:
every mode on the pipeline's own prompts, batched, resumable) with its settings (:mod:`.settings`), prompts
(:mod:`.prompts`), routing accuracy (:mod:`.accuracy`) and results on disk (:mod:`.results`); and its report
(:mod:`.report`: tables and plots, a pure function of ``results.json``)."""
