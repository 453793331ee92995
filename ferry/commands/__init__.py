"""The ``ferry`` command's subcommands, one module per group: each adds its subparsers and
handlers to the front door (:mod:`ferry.cli`). A handler imports the layer it drives
(server, client, simulations) when it runs, so that parsing stays fast."""
