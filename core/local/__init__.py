"""The embedded runtime: a whole job on one machine (processes) or on Ray."""
