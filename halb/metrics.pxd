# C types for metrics.py when it is compiled with Cython (pure Python mode: the .py file stays
# the source; this file only adds types). See halb/_ext.py.
import cython


@cython.locals(s=list, r=double)
cpdef record(dict bk, object m, object backend, object rt, bint error)
