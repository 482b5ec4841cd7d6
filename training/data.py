"""The image sources live in the core: ``vdm_engine.data``. This module re-exports them."""

from vdm_engine.data import *  # noqa: F401,F403
from vdm_engine.data import __all__  # noqa: F401
