"""qtool: make large language models small, into artifacts real runtimes load."""

__version__ = "0.1.0"
