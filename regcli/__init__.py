"""regcli: 3D medical image registration from the command line.

Public API (kept small; everything else is importable from its module):

* :class:`regcli.spaces.Grid`, :class:`regcli.spaces.Image`
* :func:`regcli.api.register`
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
