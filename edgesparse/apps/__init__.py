"""Programs built on the runtime: the command line, the terminal chat and the server."""
