/* Helpers for same-host batched EMS reads (matrixinfer/ems/native.py): the index tags of many keys,
 * and many copies from the arena into caller buffers, each in one call (declared in local_read.h).
 * Called through ctypes.PyDLL, so they run holding the GIL. */
#include "local_read.h"

#include <string.h>

/* See local_read.h. */
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

/* Index tags (matrixinfer/ems/index.py key_tag): BLAKE2b (RFC 7693) with a 16-byte digest, keyed
 * with the namespace's salt. The keyed state after the key block is the same for every key of a
 * batch, so it is computed once: a key of up to 128 bytes then costs one compression. */
static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};
static const uint8_t SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

#define ROTR(x, n) (((x) >> (n)) | ((x) << (64 - (n))))
#define G(a, b, c, d, x, y)                                    \
    do {                                                       \
        v[a] += v[b] + (x); v[d] = ROTR(v[d] ^ v[a], 32);     \
        v[c] += v[d];       v[b] = ROTR(v[b] ^ v[c], 24);     \
        v[a] += v[b] + (y); v[d] = ROTR(v[d] ^ v[a], 16);     \
        v[c] += v[d];       v[b] = ROTR(v[b] ^ v[c], 63);     \
    } while (0)

static void compress(uint64_t h[8], const uint8_t block[128], uint64_t bytes, int last) {
    uint64_t m[16], v[16];
    memcpy(m, block, 128);  /* the words are little-endian: the index is used on x86-64 only */
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= bytes;  /* byte counter, low word (keys are far below 2**64 bytes) */
    if (last)
        v[14] = ~v[14];
    for (int r = 0; r < 12; r++) {
        const uint8_t *s = SIGMA[r];
        G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++)
        h[i] ^= v[i] ^ v[i + 8];
}

/* Returns 0, or -1 when an item is not bytes (nothing to rely on in tags then). */
int ems_tags(PyObject *keys, const uint8_t *salt, Py_ssize_t salt_len, uint64_t *tags) {
    uint64_t start[8], keyed[8];
    uint8_t key_block[128] = {0};
    if (salt_len < 1 || salt_len > 64)
        return -1;
    memcpy(key_block, salt, (size_t)salt_len);
    memcpy(start, IV, sizeof start);
    start[0] ^= 0x01010000ULL ^ ((uint64_t)salt_len << 8) ^ 16;  /* fanout 1, depth 1, key, digest */
    memcpy(keyed, start, sizeof keyed);
    compress(keyed, key_block, 128, 0);  /* the key block, when a message follows */
    Py_ssize_t n = PyList_GET_SIZE(keys);
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *key = PyList_GET_ITEM(keys, j);
        if (!PyBytes_Check(key))
            return -1;
        const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(key);
        Py_ssize_t left = PyBytes_GET_SIZE(key);
        uint64_t h[8], done = 128;
        uint8_t last[128];
        if (left == 0) {  /* the key block is the last block */
            memcpy(h, start, sizeof h);
            compress(h, key_block, 128, 1);
        } else {
            memcpy(h, keyed, sizeof h);
            for (; left > 128; left -= 128, p += 128) {
                done += 128;
                compress(h, p, done, 0);
            }
            memset(last, 0, sizeof last);
            memcpy(last, p, (size_t)left);
            compress(h, last, done + (uint64_t)left, 1);
        }
        tags[2 * j] = h[0] | 1;
        tags[2 * j + 1] = h[1];
    }
    return 0;
}
