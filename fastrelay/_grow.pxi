# The one way arrays and buffers grow in the compiled module, and the
# connection registries built on it (room members, all clients, the flush
# list).

from cpython.ref cimport PyObject, Py_INCREF
from libc.stdlib cimport realloc


cdef int grow(void **items, size_t *cap, size_t need, size_t item_size,
              size_t first_cap) except -1:
    """Make *items hold at least `need` items of `item_size` bytes: the
    capacity starts at first_cap and doubles. Contents are kept."""
    cdef size_t new_cap
    cdef void *grown
    if need <= cap[0]:
        return 0
    new_cap = cap[0] if cap[0] else first_cap
    while new_cap < need:
        new_cap *= 2
    grown = realloc(items[0], new_cap * item_size)
    if grown == NULL:
        raise MemoryError()
    items[0] = grown
    cap[0] = new_cap
    return 0


cdef inline Py_ssize_t registry_push(Registry *r, object item) except -1:
    """Append item (taking a reference); returns its index."""
    grow(<void **>&r.items, &r.cap, r.count + 1, sizeof(PyObject *), 4)
    Py_INCREF(item)
    r.items[r.count] = <PyObject *>item
    r.count += 1
    return r.count - 1


cdef inline PyObject *registry_take(Registry *r, Py_ssize_t i) noexcept:
    """Remove the item at i by moving the last one into its place; returns
    the moved item (whose index is now i), or NULL. The caller drops the
    removed item's reference."""
    r.count -= 1
    if i == r.count:
        return NULL
    r.items[i] = r.items[r.count]
    return r.items[i]
