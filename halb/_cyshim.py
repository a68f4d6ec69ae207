"""Stands in for Cython's ``cython`` module where Cython is not installed.

Modules that Cython compiles in pure-Python mode (see halb/_ext.py) may branch on
``cython.compiled`` to use C-level loops when compiled; run as plain Python, the other branch
is taken. Import it as::

    try:
        import cython
    except ImportError:
        from halb import _cyshim as cython
"""

compiled = False


def _keep(flag: bool):
    return lambda f: f


boundscheck = wraparound = _keep  # directives for the compiler; as Python they change nothing


def cast(_type, value):
    """``cython.cast(T, v)``: as Python, ``v`` itself."""
    return value



def locals(**_types):  # noqa: A001 - Cython's name
    """``@cython.locals(x=cython.int)``: C types for the compiler; as Python, nothing."""
    return lambda f: f


# C type names used in ``cython.locals`` and ``cython.cast``: as Python, plain ``int``
int = int  # noqa: A001
