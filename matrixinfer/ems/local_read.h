/* EMS's same-host read helpers (local_read.c): every exported function. local_read.c includes it,
 * and matrixinfer/native_build.py parses it into the ctypes bindings matrixinfer/ems/native.py
 * calls. Called through ctypes.PyDLL, so they run holding the GIL (they use the Python C API). */
#ifndef MATRIXINFER_EMS_LOCAL_READ_H
#define MATRIXINFER_EMS_LOCAL_READ_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* For j < n: copy base[offsets[j] : offsets[j] + sizes[j]] into the buffer of outs[rows[j]] (a
 * list). status[j] = 1 when copied, 0 when the buffer is too small, -1 when the object exposes no
 * writable contiguous buffer (the caller handles those). Returns the number copied. */
Py_ssize_t ems_gather(PyObject *outs, const char *base, const int64_t *rows, const int64_t *offsets,
                      const int64_t *sizes, Py_ssize_t n, int8_t *status);

/* tags[2j], tags[2j + 1] = (tag_lo, tag_hi) of keys[j] (a list of bytes) for the salt (1 to 64
 * bytes): matrixinfer/ems/index.py key_tag. Returns 0, or -1 when an item is not bytes. */
int ems_tags(PyObject *keys, const uint8_t *salt, Py_ssize_t salt_len, uint64_t *tags);

#endif
