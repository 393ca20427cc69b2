"""The train stage: train the members of a run (:func:`.run.train_run`), and decide what a
resume continues (:mod:`.resume`)."""
