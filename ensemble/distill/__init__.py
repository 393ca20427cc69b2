"""The distill stage: a student trained on the ensemble's soft targets (:mod:`.run`)."""
