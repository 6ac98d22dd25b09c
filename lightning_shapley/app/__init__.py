"""The Hydra application: the ``lightning-shapley`` command, its job, sweeps and embedded data.

:mod:`.cli` is the entry point, :mod:`.pipeline` the job (train, prune, test, export),
:mod:`.summary` and :mod:`.sweep` its tables and plots, :mod:`.data` and :mod:`.models`
the embedded digits data and CNN.
"""
