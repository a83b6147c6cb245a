"""Experiment configs: each module has ``get_config(arg=None)`` and its run command."""
