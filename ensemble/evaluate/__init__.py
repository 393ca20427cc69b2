"""The evaluate stage: one streaming pass that scores every member and combiner
(:mod:`.evaluator`, :mod:`.scoring`), the sections of the report (selective prediction,
out-of-domain detection, the token export) and the files it writes (:mod:`.report`)."""
