"""Custom components of the CalSAM bundle, imported by the configs as ``scripts``."""
