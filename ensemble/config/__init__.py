"""The experiment configuration: typed sections (:mod:`.schema`), loading and overrides
(:mod:`.loading`), and the help text written from the field docstrings (:mod:`.docs`)."""
