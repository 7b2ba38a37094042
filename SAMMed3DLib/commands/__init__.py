"""Sub-commands of the `sammed3d` command line, one module each."""
