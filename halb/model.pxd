# C types for model.py when it is compiled with Cython (pure Python mode: the .py file stays
# the source; this file only adds types). See halb/_ext.py.

cdef class Backend:
    cdef public str pool, name, host
    cdef public Py_ssize_t index, port, max_conns
    cdef public Py_ssize_t active, inflight, total, failures, consecutive_failures
    cdef public object cfg_weight, weight
    cdef public bint backup, healthy, admin_drain, maint, agent_drain, agent_maint, agent_down
    cdef public Py_ssize_t agent_weight
    cdef public str agent_said
    cdef public double ejected_until, up_since, ewma_rt
    cdef public double load, load_raw, load_at
    cpdef bint is_up(self, double now) except -1
    cpdef bint is_full(self) except -1


cpdef backend_acquire(Backend b)
cpdef backend_release(Backend b, object rt=*)


cdef class Pool:
    cdef public object cfg, balancer, on_change, view
    cdef public str name, sticky_mode, sticky_cookie
    cdef public list backends
    cdef public dict by_name
    cdef public bint _hashing, _ramping, on_5xx, resource, _load_dirty
    cdef public dict load_reports
    cdef public Py_ssize_t retries
    cpdef Backend pick(self, object key=*, object exclude=*)
