"""The command lines, one module per command; :mod:`.common` holds the error contract (one
``error:`` line, exit status 2), logging and ``--processes``."""
