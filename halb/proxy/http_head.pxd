# C types for http_head.py when it is compiled with Cython (pure Python mode: the .py file
# stays the source; this file only adds types). See halb/_ext.py.

import cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcpy


cdef inline Py_ssize_t _find(bytes data, Py_ssize_t start, Py_ssize_t end, int c) noexcept:
    """``data.find(bytes([c]), start, end)`` by memchr (-1 if absent); the compiled branches'
    byte search. The caller keeps 0 <= start and end <= len(data)."""
    cdef const char* base = PyBytes_AS_STRING(data)
    cdef const void* p
    if start >= end:
        return -1
    p = memchr(base + start, c, <size_t>(end - start))
    if p == NULL:
        return -1
    return <const char*>p - base


cdef inline bytes _alloc(Py_ssize_t n):
    """A new bytes object of ``n`` bytes for _put to fill before anyone else sees it."""
    return PyBytes_FromStringAndSize(NULL, n)


cdef inline Py_ssize_t _put(bytes out, Py_ssize_t pos, bytes piece) noexcept:
    """Copies ``piece`` into ``out`` (new, from _alloc) at ``pos``; the position after it, or
    -1 (nothing written) if it would not fit or ``pos`` is already -1."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(piece)
    if pos < 0 or pos + n > PyBytes_GET_SIZE(out):
        return -1
    memcpy(PyBytes_AS_STRING(out) + pos, PyBytes_AS_STRING(piece), n)
    return pos + n


@cython.locals(k=Py_ssize_t, c=int)
cdef bint _is(bytes name, bytes lower) except -1
@cython.locals(c=int)
cdef bint _framing_lookalike(bytes name) except -1


@cython.locals(k=Py_ssize_t, c=int)
cdef bint _is_at(bytes data, Py_ssize_t pos, bytes lower) except -1


cdef class Request:
    cdef public bytes method, target
    cdef public str version, host, path
    cdef public list headers
    cdef public object content_length
    cdef public bint chunked, has_body
    cdef public frozenset conn_tokens
    cdef public object _map
    cdef public bytes upgrade
    cdef public frozenset ws_names
    cpdef list values(self, bytes lname)


cdef _fill(Request r, bytes method, bytes target, str version, list headers, str host,
           str path, object content_length, bint chunked, frozenset conn_tokens)
cdef str _host_text(bytes host)
@cython.locals(r=Request)
cpdef Request check_request(bytes method, bytes target, str version, list headers)
cdef int _K_PLAIN, _K_HOP, _K_XFF, _K_XFP, _K_FWD
@cython.locals(ln=Py_ssize_t)
cdef int _req_kind(bytes n) except -1
cdef bytes _status_line(int status, bytes reason)
@cython.locals(sp=Py_ssize_t)
cdef bytes _reason(bytes data, Py_ssize_t start, Py_ssize_t cr)
cdef bytes _last_sline
@cython.locals(sp=Py_ssize_t, n=Py_ssize_t, k=Py_ssize_t, last=bytes)
cdef bytes _sline(bytes data, Py_ssize_t start, Py_ssize_t cr)
cdef bytes _TE_LINE
@cython.locals(lname=bytes)
cdef int _kind(bytes n, bint any_len, frozenset drop) except -1
@cython.locals(kind=int, any_len=bint, size=Py_ssize_t, total=Py_ssize_t, pos=Py_ssize_t,
               method=bytes, target=bytes, te=bytes, host_line=bytes, tail=bytes, out=bytes,
               headers=list)
cpdef bytes request_head(Request req, str client_ip, str proto, bint forwarded,
                         str default_host=*, list cache=*, bytes via=*)


cdef class ResponseHead:
    cdef public list parts, headers, conn_tokens
    cdef public object content_length
    cdef public bint chunked, conn_extra, cl_bad, has_te
    cdef public Py_ssize_t nbytes, max_headers, max_bytes
    cdef public bytes sline, upgrade
    cpdef reset(self)
    cpdef take(self, bytes block)
    @cython.locals(pos=Py_ssize_t, run=Py_ssize_t, count=Py_ssize_t,
                   eol=Py_ssize_t, colon=Py_ssize_t, ln=Py_ssize_t, drop=bint, c=int,
                   vs=Py_ssize_t, ve=Py_ssize_t, k=Py_ssize_t, d=int, cl=Py_ssize_t)
    cpdef take_range(self, bytes block, Py_ssize_t start, Py_ssize_t n)
    cpdef bytes build(self, int status, bytes reason, bint chunk, bint close,
                      object set_cookie=*, bint keep_alive=*, bytes lines=*)

cdef bytes _TCHAR, _FCHAR, _HEXVAL
cdef Py_ssize_t CHUNK_LINE_MAX
cdef int EV_NEED, EV_INTERIM, EV_HEAD, EV_BODY, EV_DONE, EV_ERROR, EV_SWITCH
cdef int _F_HEAD, _F_LEN, _F_CSIZE, _F_CDATA, _F_CEND, _F_TRAIL, _F_EOF, _F_DONE


cdef class ResponseFramer:
    cdef public ResponseHead rh
    cdef public bytes buf, piece, reason
    cdef public str error
    cdef public Py_ssize_t pos, max_head, tbytes
    cdef public long long left
    cdef public int state, status, minor
    cdef public bint keep, head_req, upgrade
    cdef public object trailers
    cpdef start(self, bint head_req, bint upgrade=*)
    cpdef feed(self, bytes data)
    cdef int _fail(self, str why) except -1
    cdef int _wait(self, Py_ssize_t have) except -1
    cdef int _line_wait(self, Py_ssize_t have) except -2
    @cython.locals(n=Py_ssize_t, st=int, pos=Py_ssize_t, take=Py_ssize_t, r=int)
    cpdef int next(self) except -1
    @cython.locals(stop=Py_ssize_t, size=cython.longlong, i=Py_ssize_t, v=int, digits=Py_ssize_t,
                   c=int)
    cdef int _chunk_size(self, bytes buf, Py_ssize_t pos, Py_ssize_t n) except -2
    @cython.locals(end=Py_ssize_t)
    cdef int _trailer_line(self, bytes buf, Py_ssize_t pos, Py_ssize_t n) except -2
    @cython.locals(pos=Py_ssize_t, end=Py_ssize_t, minor=int, status=int, k=Py_ssize_t, d=int,
                   hs=Py_ssize_t, i=Py_ssize_t, e=Py_ssize_t, bad=int, hend=Py_ssize_t,
                   rh=ResponseHead, keep=bint, toks=list)
    cdef int _head(self, bytes buf, Py_ssize_t n) except -1


@cython.locals(cr=Py_ssize_t, lf=Py_ssize_t)
cdef Py_ssize_t _line_end(bytes buf, Py_ssize_t pos, Py_ssize_t n) except -3
@cython.locals(c=int, i=Py_ssize_t)
cdef int _header_line_error(bytes buf, Py_ssize_t pos, Py_ssize_t end) except -1
