"""One module per `hyprof` subcommand, each with `register(subparsers)`."""
