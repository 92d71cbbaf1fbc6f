"""Placeholder module of ``fedkube.operator`` until the operator lands (issue 3).

It exists so that the package mapping, and the test that the standard
library's ``operator`` stays importable beside it, are exercised now.
"""

NAME = "fedkube-operator"
