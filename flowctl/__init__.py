"""flowctl: the command-line client of the flowd daemon (no docker, no lxml)."""
