"""nemo-igrpo: Iterative Group Relative Policy Optimization (arXiv 2602.09000) for verifiable math reasoning."""

__version__ = "0.1.0"
