"""Subcommands of the `dclip` command line (see `modeling_dclip.cli`)."""
