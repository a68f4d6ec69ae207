# C types for balance.py when it is compiled with Cython (pure Python mode). See halb/_ext.py.

import cython

from halb.model cimport Backend


cdef bint _usable(Backend b, object exclude) except -1


cdef class RoundRobin:
    cdef public Py_ssize_t _next

    @cython.locals(bs=tuple, n=Py_ssize_t, i=Py_ssize_t, k=Py_ssize_t, b=Backend)
    cpdef Backend pick(self, object view, object key, object exclude)
