"""Old import path of the hypothesis strategies: they live in :mod:`pytest_mlrepro.checkpoint.strategies`."""
from .checkpoint.strategies import *  # noqa: F401,F403
from .checkpoint.strategies import __all__  # noqa: F401
