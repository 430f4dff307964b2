"""Sub-commands of the ``opscale`` CLI, one module each (see :mod:`opscale.cli`)."""
