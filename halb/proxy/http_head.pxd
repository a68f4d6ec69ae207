# C types for http_head.py when it is compiled with Cython (pure Python mode: the .py file
# stays the source; this file only adds types). See halb/_ext.py.

import cython


@cython.locals(k=Py_ssize_t, c=int)
cdef bint _is(bytes name, bytes lower) except -1


cdef class Request:
    cdef public bytes method, target
    cdef public str version, host, path
    cdef public list headers
    cdef public object content_length
    cdef public bint chunked, has_body
    cdef public frozenset conn_tokens
    cdef public object _map


cdef class ResponseHead:
    cdef public list parts, headers, conn_tokens
    cdef public object content_length
    cdef public bint chunked, conn_extra
    cdef public Py_ssize_t nbytes, max_headers, max_bytes
    cpdef reset(self)
    cpdef bytes build(self, int status, bytes reason, bint chunk, bint close,
                      object set_cookie=*, bint keep_alive=*)
