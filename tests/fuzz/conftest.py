"""The fuzz tests' hypothesis profile: ``ci`` unless FEDKUBE_FUZZ_PROFILE names another.

Registered and loaded in :mod:`tests.fuzz.properties`, which every module
here imports too: the profile is in force before any ``@settings`` is read.
"""

from tests.fuzz import properties

__all__ = ["properties"]
