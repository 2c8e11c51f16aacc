"""The ``qatkit`` command: one module per subcommand, each importing only what it runs.

``main`` builds the parser from each subcommand's ``add_arguments`` (no torch import, so
``qatkit --help`` answers at once) and calls its ``run`` only for the chosen subcommand.
"""
