"""The ``edgeroute`` command line: each subcommand's argument parsing and printing, nothing else."""
