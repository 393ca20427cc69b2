"""The generate stage: the ensemble as a Hugging Face causal LM (:mod:`.model`) and the
`launch/generate.py` printer of continuations and their uncertainty (:mod:`.printer`)."""
