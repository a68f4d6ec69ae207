# C types for http.py when it is compiled with Cython (pure Python mode: the .py file stays
# the source and runs as is without a compiler; this file only adds types). See halb/_ext.py.

import cython

from halb.metrics cimport record
from halb.proxy.routing cimport Router
from halb.model cimport Backend, Pool, backend_acquire, backend_release
from halb.proxy.http_head cimport (Request, ResponseFramer, ResponseHead, check_request,
                                   request_head, _F_DONE, EV_BODY, EV_DONE, EV_HEAD,
                                   EV_INTERIM, EV_NEED, EV_SWITCH)
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC


@cython.locals(ts=timespec)
cdef double _clock() noexcept


cdef class _Settings:
    cdef public Py_ssize_t max_line, max_headers, max_header_bytes, max_conns
    cdef public double t_header, t_body, t_idle, t_server, t_connect, t_tunnel
    cdef public bint forwarded
    cdef public str proto, name
    cdef public object metrics
    cdef public dict bk
    cdef public bytes via10, via11
    cdef public bint alog_on


cdef class HttpListener:
    cdef public object cfg, env, name, ssl, proto, server, loop, _sweeper, handover
    cdef public object alog, cache, cache_pools, h2, h2b
    cdef public Router router
    cdef public dict pools
    cdef public set conns
    cdef public dict idle
    cdef public _Settings settings
    cdef public bint stopping, ob_armed
    cdef public double tick
    cdef public list ob_c, ob_b
    cpdef defer_c(self, ClientConn cc)
    cpdef defer_b(self, BackendConn bc)
    @cython.locals(bc=BackendConn, cc=ClientConn, lb=list, lc=list)
    cpdef send_all(self)
    cpdef BackendConn take_idle(self, object b)
    cpdef put_idle(self, BackendConn bc)
    cpdef drop_idle(self, BackendConn bc)


cdef class _Rx:
    cdef public Request req
    cdef public bint keep_alive, complete
    cdef public object body
    cdef public Py_ssize_t buffered, replay_bytes
    cdef public object replay
    cdef public double t0, th


cdef class BackendConn:
    cdef public HttpListener l
    cdef public object b, loop, tr
    cdef public ResponseFramer fr
    cdef public ResponseHead rh
    cdef public ClientConn cc
    cdef public bint keep, msg_done, doubtful, got_bytes, read_paused
    cdef public bint closed, close_delimited, queued, tun
    cdef public double last, idle_since
    cdef public list out
    cdef queue(self)
    cpdef send_now(self)
    cpdef pause_reading(self)
    cpdef resume_reading(self)
    cpdef close(self)


cdef class ClientConn:
    cdef public HttpListener l
    cdef public object env, loop, tr, parser, pending_error, wtimer, connecting
    cdef public Pool pool
    cdef public str client_ip, tkind
    cdef public bytes url
    cdef public list hdrs, queue, out, up
    cdef public _Rx rx
    cdef public Backend b
    cdef public tuple tried
    cdef public object last_err, sticky_b, cookie_val, hkey
    cdef public _Settings s
    cdef public list fwd
    cdef public str lver
    cdef public _Rx cur
    cdef public BackendConn conn
    cdef public bint accepted, closed, eof, in_head, wpaused, acquired, reused, stale_retry
    cdef public bint sent_all, resp_started, resp_chunk, resp_close, queued, tunnel, synth
    cdef public object held, skip, raw_target
    cdef public int shut
    cdef public Py_ssize_t hi_start, hi_end
    cdef public int paused, attempts, status
    cdef public Py_ssize_t raw_head, hbytes
    cdef public object alog
    cdef public int cport
    cdef public double t_begin, t_start, t_resp
    cdef public Py_ssize_t nb, nup
    cdef public str why, lterm
    cdef public _Rx lrx
    cdef public double deadline, t0
    cdef public object cst
    cdef public str lcache
    cpdef flush(self)
    cpdef put(self, bytes data)
    @cython.locals(n=Py_ssize_t)
    cpdef send_now(self)
    cdef _flush_up(self)
    @cython.locals(i=Py_ssize_t, n=Py_ssize_t, lim=Py_ssize_t, stop=Py_ssize_t, j=Py_ssize_t,
                   end=Py_ssize_t, sp=Py_ssize_t, c=int, prev=int, dbl=bint, hi=bint)
    cdef bint _check_line(self, bytes data) except -1
    @cython.locals(minor=int)
    cdef _note_version(self, bytes data, Py_ssize_t at)
    cdef _arm(self, str kind, double timeout)
    cdef _cancel_timer(self)
    cdef _cancel_timers(self)
    cpdef pause(self, int why)
    cpdef resume(self, int why)
    @cython.locals(router=Router, pool=Pool)
    cdef _start(self, _Rx rx)
    @cython.locals(pool=Pool)
    cdef _attempt(self)
    cdef _attach(self, BackendConn bc, bint reused)
    cdef _release(self, object rt, bint error)
    @cython.locals(pool=Pool)
    cpdef tuple resp_head(self, BackendConn bc, int status, ResponseHead rh)
    cpdef resp_body(self, bytes data)
    cpdef resp_done(self, BackendConn bc, bint reusable)
    cdef _next(self)
    cdef _alog_x(self, _Rx rx, int status, str term)
