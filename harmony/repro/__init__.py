"""Reproduction benchmark: every method of the paper's tables, same data and budget, one report."""
