# C types for routing.py when it is compiled with Cython (pure Python mode). See halb/_ext.py.
import cython

from halb.proxy.http_head cimport Request


cdef class _Route:
    cdef public str pool, host, host_port, prefix, hname, hvalue
    cdef public bytes hname_b
    cdef public bint wildcard
    cpdef bint matches(self, str host, str port, str path, object headers) except -1


cdef class Router:
    cdef public tuple routes
    cdef public str default
    cdef public bint needs_headers
    cdef public dict _hosts

    @cython.locals(r=_Route, hp=tuple)
    cpdef str route(self, str host, str path, object headers=*)
