"""flowd: a dataflow workflow daemon that runs each task in a Docker container."""
__version__ = "0.1.0"
