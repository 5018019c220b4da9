"""The ``maskclip`` command: ``segment`` and ``eval`` here, more subcommands from plugins.

:mod:`.main` holds the command group (the ``maskclip`` entry point is
``maskclip_engine.cli.main:main``; ``python -m maskclip_engine`` runs the same),
:mod:`.options` the option groups the subcommands share. Subcommands that need
a queue (``train``, ``jobs``, ``predict``, ``review``, ...) come from the
``maskclip.commands`` entry-point group, so the engine's CLI imports no queue code.
"""
