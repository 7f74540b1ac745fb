"""One module per `vla` subcommand; each exposes ``main(argv: list[str]) -> int``."""
