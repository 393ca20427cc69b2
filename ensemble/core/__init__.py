"""What every stage shares about models and data: members (their directories, loading and the
ensemble check), architectures, data and tokenizers, the combiners, the metric accumulators,
the uncertainty decomposition, the chunked output layer and weight soups. Nothing here knows
about processes (that is :mod:`ensemble.runtime`) or about a stage."""
