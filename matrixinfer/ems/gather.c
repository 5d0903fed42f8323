/* Copies for same-host batched EMS reads (matrixinfer/ems/native.py): one call copies many arena
 * ranges into many caller buffers. Called through ctypes.PyDLL, so it runs holding the GIL. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* For j < n: copy base[offsets[j] : offsets[j] + sizes[j]] into the buffer of outs[rows[j]] (a
 * list). status[j] = 1 when copied, 0 when the buffer is too small, -1 when the object exposes no
 * writable contiguous buffer (the caller handles those). Returns the number copied. */
Py_ssize_t ems_gather(PyObject *outs, const char *base, const int64_t *rows, const int64_t *offsets,
                      const int64_t *sizes, Py_ssize_t n, int8_t *status) {
    Py_ssize_t copied = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        status[j] = -1;
        if (rows[j] < 0 || rows[j] >= PyList_GET_SIZE(outs))
            continue;
        PyObject *out = PyList_GET_ITEM(outs, rows[j]);
        Py_buffer view;
        Py_INCREF(out);  /* an exporter may run Python code, which could drop the list's reference */
        if (PyObject_GetBuffer(out, &view, PyBUF_WRITABLE) < 0) {
            PyErr_Clear();
        } else {
            status[j] = view.len >= sizes[j];
            if (status[j]) {
                memmove(view.buf, base + offsets[j], (size_t)sizes[j]);  /* memcpy unless it overlaps */
                copied++;
            }
            PyBuffer_Release(&view);
        }
        Py_DECREF(out);
    }
    return copied;
}
