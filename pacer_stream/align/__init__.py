"""Permutation alignment: cost accumulation, assignment solvers, the matcher."""
