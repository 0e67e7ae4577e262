/* A prepared kernel launch in C: the hot path of plans and memoized calls.
 *
 * A PreparedLaunch holds one kernel's packed parameter block (ParamLayout in launch.py)
 * and its launch configuration. Calling it, launch(stream, p0, p1, ...), copies the
 * block to the stack, writes the array data pointers p0, p1, ... into their 8-byte
 * slots and makes one cuLaunchKernel call (the block handed over whole through
 * CU_LAUNCH_PARAM_BUFFER_POINTER), with the GIL released around the driver. It is the
 * same launch as launch.Bound.fixed's generated Python, without the interpreter: no
 * frame, no lock (the copy is per call, so threads never share a block being written),
 * no Python wrapper around the driver.
 *
 * libcuda is opened on first use with dlopen, so the module builds and imports on
 * machines without a GPU (the simulator, CI); there a launch raises OSError, and
 * block(p0, ...) still shows the bytes a launch would hand the driver.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef int (*cu_launch_kernel_fn)(void *function, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                   unsigned by, unsigned bz, unsigned shared, void *stream, void **params,
                                   void **extra);

static cu_launch_kernel_fn cu_launch_kernel = NULL;

/* cuda.h's CU_LAUNCH_PARAM_* markers of the extra array */
#define PARAM_END ((void *)0x00)
#define PARAM_BUFFER_POINTER ((void *)0x01)
#define PARAM_BUFFER_SIZE ((void *)0x02)

/* The largest parameter block a launch may pass (Hopper, CUDA 12.1+); ours are ~1 KB */
#define MAX_BLOCK_BYTES 32764
#define STACK_WORDS 512

static int resolve_driver(void) {
    if (cu_launch_kernel != NULL)
        return 0;
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        PyErr_Format(PyExc_OSError, "nbflash._fastlaunch: cannot open libcuda.so.1: %s", dlerror());
        return -1;
    }
    void *symbol = dlsym(lib, "cuLaunchKernel");
    if (symbol == NULL) {
        PyErr_SetString(PyExc_OSError, "nbflash._fastlaunch: libcuda.so.1 has no cuLaunchKernel");
        return -1;
    }
    cu_launch_kernel = (cu_launch_kernel_fn)symbol;
    return 0;
}

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    void *function;              /* CUfunction (or CUkernel) handle */
    unsigned grid[3], block[3], shared;
    size_t size;                 /* bytes of the parameter block */
    Py_ssize_t words;            /* 8-byte words holding it */
    uint64_t *packed;            /* the block as packed once */
    Py_ssize_t nslots;           /* data pointers a call writes, in order */
    Py_ssize_t *slots;           /* their word indices */
    PyObject *on_failure;        /* on_failure(rc, stream, (p0, ...)) after a failed launch */
} PreparedLaunch;

static void prepared_dealloc(PreparedLaunch *self) {
    PyObject_GC_UnTrack(self);
    PyMem_Free(self->packed);
    PyMem_Free(self->slots);
    Py_CLEAR(self->on_failure);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int prepared_traverse(PreparedLaunch *self, visitproc visit, void *arg) {
    Py_VISIT(self->on_failure);
    return 0;
}

static int prepared_clear(PreparedLaunch *self) {
    Py_CLEAR(self->on_failure);
    return 0;
}

static int read_u64(PyObject *value, uint64_t *out, const char *what, Py_ssize_t i) {
    /* an int, or what has __index__ (numpy integers), as the Python launch takes */
    PyObject *number = PyLong_CheckExact(value) ? (Py_INCREF(value), value) : PyNumber_Index(value);
    if (number == NULL) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s %zd: expected an int; got %R", what, i, value);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(number);
    Py_DECREF(number);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_OverflowError, "%s %zd: expected an int in [0, 2**64); got %R", what, i, value);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* The block with the given pointers written into a caller's words (nargs == nslots). */
static int fill(PreparedLaunch *self, uint64_t *words, PyObject *const *ptrs) {
    memcpy(words, self->packed, (size_t)self->words * 8);
    for (Py_ssize_t i = 0; i < self->nslots; i++) {
        if (read_u64(ptrs[i], &words[self->slots[i]], "pointer", i) < 0)
            return -1;
    }
    return 0;
}

static PyObject *prepared_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    PreparedLaunch *self = (PreparedLaunch *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames)) {
        PyErr_SetString(PyExc_TypeError, "PreparedLaunch: takes no keyword arguments");
        return NULL;
    }
    if (nargs != 1 + self->nslots) {
        PyErr_Format(PyExc_TypeError, "PreparedLaunch: takes the stream and %zd pointers; got %zd arguments",
                     self->nslots, nargs);
        return NULL;
    }
    if (cu_launch_kernel == NULL && resolve_driver() < 0)
        return NULL;
    uint64_t stream;
    if (read_u64(args[0], &stream, "stream", 0) < 0)
        return NULL;
    uint64_t stack_words[STACK_WORDS];
    uint64_t *words = stack_words;
    if (self->words > STACK_WORDS) {
        words = PyMem_Malloc((size_t)self->words * 8);
        if (words == NULL)
            return PyErr_NoMemory();
    }
    if (fill(self, words, args + 1) < 0) {
        if (words != stack_words)
            PyMem_Free(words);
        return NULL;
    }
    size_t size = self->size;
    void *extra[5] = {PARAM_BUFFER_POINTER, words, PARAM_BUFFER_SIZE, &size, PARAM_END};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = cu_launch_kernel(self->function, self->grid[0], self->grid[1], self->grid[2], self->block[0],
                          self->block[1], self->block[2], self->shared, (void *)(uintptr_t)stream, NULL,
                          size ? extra : NULL);
    Py_END_ALLOW_THREADS
    if (words != stack_words)
        PyMem_Free(words);
    if (rc == 0)
        Py_RETURN_NONE;
    if (self->on_failure == NULL)
        return PyErr_Format(PyExc_RuntimeError, "PreparedLaunch: cuLaunchKernel failed with CUresult %d", rc);
    PyObject *ptrs = PyTuple_New(self->nslots);
    if (ptrs == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->nslots; i++) {
        Py_INCREF(args[1 + i]);
        PyTuple_SET_ITEM(ptrs, i, args[1 + i]);
    }
    PyObject *result = PyObject_CallFunction(self->on_failure, "iOO", rc, args[0], ptrs);
    Py_DECREF(ptrs);
    return result;
}

static int read_dims(PyObject *dims, unsigned out[3], const char *name) {
    if (!PyTuple_Check(dims) || PyTuple_GET_SIZE(dims) != 3) {
        PyErr_Format(PyExc_TypeError, "PreparedLaunch: %s must be a tuple of 3 ints; got %R", name, dims);
        return -1;
    }
    for (int i = 0; i < 3; i++) {
        unsigned long v = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(dims, i));
        if (PyErr_Occurred() || v == 0 || v > 0xFFFFFFFFul) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "PreparedLaunch: %s must hold 3 ints in [1, 2**32); got %R", name, dims);
            return -1;
        }
        out[i] = (unsigned)v;
    }
    return 0;
}

/* PreparedLaunch(function, grid, block, shared, block_bytes, slots, on_failure) */
static PyObject *prepared_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *function_arg, *grid, *block, *shared_arg, *slots, *on_failure;
    Py_buffer bytes;
    static char *names[] = {"function", "grid", "block", "shared", "block_bytes", "slots", "on_failure", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOy*OO:PreparedLaunch", names, &function_arg, &grid, &block,
                                     &shared_arg, &bytes, &slots, &on_failure))
        return NULL;
    PreparedLaunch *self = NULL;
    PyObject *seq = NULL;
    uint64_t function, shared;
    if (read_u64(function_arg, &function, "function", 0) < 0 || read_u64(shared_arg, &shared, "shared", 0) < 0)
        goto fail;
    if (shared > 0xFFFFFFFFull) {
        PyErr_Format(PyExc_OverflowError, "PreparedLaunch: shared must be below 2**32; got %R", shared_arg);
        goto fail;
    }
    if (bytes.len > MAX_BLOCK_BYTES) {
        PyErr_Format(PyExc_ValueError, "PreparedLaunch: a %zd-byte parameter block is over %d bytes", bytes.len,
                     MAX_BLOCK_BYTES);
        goto fail;
    }
    if (!PyCallable_Check(on_failure)) {
        PyErr_SetString(PyExc_TypeError, "PreparedLaunch: on_failure must be callable");
        goto fail;
    }
    self = (PreparedLaunch *)type->tp_alloc(type, 0);
    if (self == NULL)
        goto fail;
    self->vectorcall = prepared_vectorcall;
    self->function = (void *)(uintptr_t)function;
    self->shared = (unsigned)shared;
    if (read_dims(grid, self->grid, "grid") < 0 || read_dims(block, self->block, "block") < 0)
        goto fail;
    self->size = (size_t)bytes.len;
    self->words = bytes.len ? (bytes.len + 7) / 8 : 1;
    self->packed = PyMem_Calloc((size_t)self->words, 8);
    if (self->packed == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    memcpy(self->packed, bytes.buf, (size_t)bytes.len);
    seq = PySequence_Fast(slots, "PreparedLaunch: slots must be a sequence of word indices");
    if (seq == NULL)
        goto fail;
    self->nslots = PySequence_Fast_GET_SIZE(seq);
    self->slots = PyMem_Calloc(self->nslots ? (size_t)self->nslots : 1, sizeof(Py_ssize_t));
    if (self->slots == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < self->nslots; i++) {
        Py_ssize_t slot = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, i));
        if (slot == -1 && PyErr_Occurred())
            goto fail;
        if (slot < 0 || (size_t)slot >= self->size / 8) {
            PyErr_Format(PyExc_ValueError, "PreparedLaunch: slot %zd lies outside the %zu-byte block", slot,
                         self->size);
            goto fail;
        }
        self->slots[i] = slot;
    }
    Py_DECREF(seq);
    Py_INCREF(on_failure);
    self->on_failure = on_failure;
    PyBuffer_Release(&bytes);
    return (PyObject *)self;
fail:
    Py_XDECREF(seq);
    Py_XDECREF(self);
    PyBuffer_Release(&bytes);
    return NULL;
}

static PyObject *prepared_block(PreparedLaunch *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != self->nslots) {
        PyErr_Format(PyExc_TypeError, "block: takes %zd pointers; got %zd", self->nslots, nargs);
        return NULL;
    }
    uint64_t *words = PyMem_Malloc((size_t)self->words * 8);
    if (words == NULL)
        return PyErr_NoMemory();
    PyObject *result = NULL;
    if (fill(self, words, args) == 0)
        result = PyBytes_FromStringAndSize((const char *)words, (Py_ssize_t)self->size);
    PyMem_Free(words);
    return result;
}

static PyObject *prepared_repeat(PreparedLaunch *self, PyObject *const *args, Py_ssize_t nargs) {
    /* repeat(n, stream, p0, ...): n launches from one C loop (perf: the driver's own floor) */
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "repeat: takes n, the stream and the pointers");
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[0]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *r = prepared_vectorcall((PyObject *)self, args + 1, (size_t)(nargs - 1), NULL);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
        if ((i & 1023) == 1023 && PyErr_CheckSignals() < 0)
            return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *get_nslots(PreparedLaunch *self, void *closure) { return PyLong_FromSsize_t(self->nslots); }

static PyObject *get_config(PreparedLaunch *self, void *closure) {
    return Py_BuildValue("(III)(III)I", self->grid[0], self->grid[1], self->grid[2], self->block[0], self->block[1],
                         self->block[2], self->shared);
}

static PyMethodDef prepared_methods[] = {
    {"block", (PyCFunction)(void (*)(void))prepared_block, METH_FASTCALL,
     "block(p0, ...) -> bytes: the parameter block a launch with these pointers hands the driver"},
    {"repeat", (PyCFunction)(void (*)(void))prepared_repeat, METH_FASTCALL,
     "repeat(n, stream, p0, ...): n launches from one C loop (for timing the driver alone)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef prepared_getset[] = {
    {"nslots", (getter)get_nslots, NULL, "how many data pointers a call writes", NULL},
    {"config", (getter)get_config, NULL, "(grid, block, shared bytes)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PreparedLaunchType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nbflash._fastlaunch.PreparedLaunch",
    .tp_basicsize = sizeof(PreparedLaunch),
    .tp_dealloc = (destructor)prepared_dealloc,
    .tp_vectorcall_offset = offsetof(PreparedLaunch, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "PreparedLaunch(function, grid, block, shared, block_bytes, slots, on_failure): "
              "launch(stream, p0, ...) writes the data pointers into a copy of the block and calls cuLaunchKernel",
    .tp_traverse = (traverseproc)prepared_traverse,
    .tp_clear = (inquiry)prepared_clear,
    .tp_methods = prepared_methods,
    .tp_getset = prepared_getset,
    .tp_new = prepared_new,
};

/* ------------------------------------------------------------------------------------
 * The remembered-call hot path of plans.memoized_attention and AttentionPlan.run
 *
 * run(table, prefix, q, k, v, out, ndarray, empty, get_stream): for CuPy arrays q, k, v
 * (and out, or None) of exactly the type ``ndarray``, the key plans._call_key builds,
 * after ``prefix``; on a hit in ``table`` (a dict of plans._Prepared), the overlap check
 * of out against q, k, v, out allocated by empty(entry.out_shape, entry.dtype) when
 * None, and entry.go(get_stream().ptr, q, k, v, out data pointers): returns out. None
 * (nothing launched, nothing allocated) on a miss or another array type. Raises the
 * entry's overlap_error, or what go raises (launch.LaunchError).
 * ------------------------------------------------------------------------------------ */

static PyObject *s_data, *s_ptr, *s_shape, *s_c_contiguous, *s_strides, *s_dtype, *s_device_id, *s_go, *s_ov,
    *s_out_shape, *s_overlap_error;

/* the (shape, c_contiguous or strides, dtype, device_id) of one array and its data pointer */
typedef struct {
    PyObject *shape, *layout, *dtype, *device, *ptr;
    unsigned long long address;
} ArrayKey;

static void array_key_clear(ArrayKey *a) {
    Py_CLEAR(a->shape);
    Py_CLEAR(a->layout);
    Py_CLEAR(a->dtype);
    Py_CLEAR(a->device);
    Py_CLEAR(a->ptr);
}

static int array_key(PyObject *array, ArrayKey *a) {
    PyObject *memory = PyObject_GetAttr(array, s_data);
    if (memory == NULL)
        return -1;
    a->ptr = PyObject_GetAttr(memory, s_ptr);
    a->device = a->ptr ? PyObject_GetAttr(memory, s_device_id) : NULL;
    Py_DECREF(memory);
    if (a->device == NULL)
        return -1;
    a->address = PyLong_AsUnsignedLongLongMask(a->ptr);
    if (PyErr_Occurred())
        return -1;
    a->shape = PyObject_GetAttr(array, s_shape);
    if (a->shape == NULL)
        return -1;
    PyObject *contiguous = PyObject_GetAttr(array, s_c_contiguous);
    if (contiguous == NULL)
        return -1;
    int truth = PyObject_IsTrue(contiguous);
    if (truth < 0) {
        Py_DECREF(contiguous);
        return -1;
    }
    if (truth) {
        a->layout = contiguous;  /* `x._c_contiguous or x.strides`: the flag itself */
    } else {
        Py_DECREF(contiguous);
        a->layout = PyObject_GetAttr(array, s_strides);
        if (a->layout == NULL)
            return -1;
    }
    a->dtype = PyObject_GetAttr(array, s_dtype);
    return a->dtype == NULL ? -1 : 0;
}

#define SET(tuple, i, value) (Py_INCREF(value), PyTuple_SET_ITEM(tuple, i, value))

/* prefix + plans._call_key(q, k, v, out) from the arrays' parts (a[3]: out's, when with_out) */
static PyObject *build_key(PyObject *prefix, ArrayKey a[4], int with_out) {
    Py_ssize_t np = PyTuple_GET_SIZE(prefix);
    PyObject *key = PyTuple_New(np + 13 + 4 * with_out);
    if (key == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < np; i++)
        SET(key, i, PyTuple_GET_ITEM(prefix, i));
    for (int i = 0; i < 3; i++) {
        SET(key, np + 2 * i, a[i].shape);
        SET(key, np + 2 * i + 1, a[i].layout);
        SET(key, np + 6 + i, a[i].dtype);
        SET(key, np + 9 + i, a[i].device);
    }
    /* whether q, k, v start on 16 bytes (the kernel choice reads it) */
    SET(key, np + 12, ((a[0].address | a[1].address | a[2].address) & 15) ? Py_False : Py_True);
    if (with_out) {
        SET(key, np + 13, a[3].shape);
        SET(key, np + 14, a[3].layout);
        SET(key, np + 15, a[3].dtype);
        SET(key, np + 16, a[3].device);
    }
    return key;
}

static PyObject *hot_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "run: takes table, prefix, q, k, v, out, ndarray, empty, get_stream");
        return NULL;
    }
    PyObject *table = args[0], *prefix = args[1], *out = args[5], *nd = args[6];
    if (!PyDict_CheckExact(table) || !PyTuple_CheckExact(prefix)) {
        PyErr_SetString(PyExc_TypeError, "run: table must be a dict and prefix a tuple");
        return NULL;
    }
    int with_out = out != Py_None;
    for (int i = 2; i < 5 + with_out; i++) {
        if ((PyObject *)Py_TYPE(args[i]) != nd)
            Py_RETURN_NONE;
    }
    ArrayKey a[4];
    memset(a, 0, sizeof(a));
    PyObject *key = NULL, *entry = NULL, *go = NULL, *result = NULL, *stream = NULL, *sp = NULL;
    for (int i = 0; i < 3 + with_out; i++) {
        if (array_key(args[2 + i], &a[i]) < 0)
            goto done;
    }
    key = build_key(prefix, a, with_out);
    if (key == NULL)
        goto done;
    entry = PyDict_GetItemWithError(table, key);  /* borrowed */
    if (entry == NULL)
        goto done;  /* a miss (None), or the error of a failed hash */
    Py_INCREF(entry);
    if (with_out) {
        PyObject *ov = PyObject_GetAttr(entry, s_ov);
        if (ov == NULL)
            goto done;
        if (ov != Py_None && !(PyTuple_CheckExact(ov) && PyTuple_GET_SIZE(ov) == 6)) {
            PyErr_Format(PyExc_TypeError, "run: entry.ov must be None or a tuple of 6 ints; got %R", ov);
            Py_DECREF(ov);
            goto done;
        }
        if (ov != Py_None) {
            long long bounds[6];
            for (int i = 0; i < 6; i++) {
                bounds[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(ov, i));
                if (bounds[i] == -1 && PyErr_Occurred()) {
                    Py_DECREF(ov);
                    goto done;
                }
            }
            Py_DECREF(ov);
            for (int i = 0; i < 3; i++) {
                long long d = (long long)(a[i].address - a[3].address);
                if (bounds[2 * i] <= d && d <= bounds[2 * i + 1]) {
                    PyObject *error = PyObject_CallMethodObjArgs(entry, s_overlap_error, a[3].ptr, a[0].ptr,
                                                                 a[1].ptr, a[2].ptr, NULL);
                    if (error != NULL) {
                        PyErr_SetObject((PyObject *)Py_TYPE(error), error);
                        Py_DECREF(error);
                    }
                    goto done;
                }
            }
        } else {
            Py_DECREF(ov);
        }
        Py_INCREF(out);
    } else {
        PyObject *shape = PyObject_GetAttr(entry, s_out_shape);
        PyObject *dtype = shape ? PyObject_GetAttr(entry, s_dtype) : NULL;
        if (shape != NULL && dtype != NULL)
            out = PyObject_CallFunctionObjArgs(args[7], shape, dtype, NULL);
        else
            out = NULL;
        Py_XDECREF(shape);
        Py_XDECREF(dtype);
        if (out == NULL)
            goto done;
        PyObject *memory = PyObject_GetAttr(out, s_data);
        a[3].ptr = memory ? PyObject_GetAttr(memory, s_ptr) : NULL;
        Py_XDECREF(memory);
        if (a[3].ptr == NULL) {
            Py_DECREF(out);
            goto done;
        }
    }
    stream = PyObject_CallNoArgs(args[8]);
    sp = stream ? PyObject_GetAttr(stream, s_ptr) : NULL;
    go = sp ? PyObject_GetAttr(entry, s_go) : NULL;
    if (go == NULL) {
        Py_DECREF(out);
        goto done;
    }
    PyObject *call[5] = {sp, a[0].ptr, a[1].ptr, a[2].ptr, a[3].ptr};
    PyObject *launched = PyObject_Vectorcall(go, call, 5, NULL);
    if (launched == NULL) {
        Py_DECREF(out);
        goto done;
    }
    Py_DECREF(launched);
    result = out;
done:
    for (int i = 0; i < 4; i++)
        array_key_clear(&a[i]);
    Py_XDECREF(key);
    Py_XDECREF(entry);
    Py_XDECREF(go);
    Py_XDECREF(stream);
    Py_XDECREF(sp);
    if (result == NULL && !PyErr_Occurred())
        Py_RETURN_NONE;
    return result;
}

static PyObject *hot_key(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    /* key(prefix, q, k, v, out): the key run looks up (tests compare it with plans._call_key) */
    if (nargs != 5 || !PyTuple_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "key: takes prefix (a tuple), q, k, v, out");
        return NULL;
    }
    int with_out = args[4] != Py_None;
    ArrayKey a[4];
    memset(a, 0, sizeof(a));
    PyObject *key = NULL;
    for (int i = 0; i < 3 + with_out; i++) {
        if (array_key(args[1 + i], &a[i]) < 0)
            goto done;
    }
    key = build_key(args[0], a, with_out);
done:
    for (int i = 0; i < 4; i++)
        array_key_clear(&a[i]);
    return key;
}

static PyObject *driver_available(PyObject *module, PyObject *unused) {
    if (resolve_driver() < 0) {
        PyErr_Clear();
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyMethodDef module_methods[] = {
    {"driver_available", driver_available, METH_NOARGS, "whether libcuda.so.1 and its cuLaunchKernel load"},
    {"run", (PyCFunction)(void (*)(void))hot_run, METH_FASTCALL,
     "run(table, prefix, q, k, v, out, ndarray, empty, get_stream): a remembered call's launch, or None"},
    {"key", (PyCFunction)(void (*)(void))hot_key, METH_FASTCALL,
     "key(prefix, q, k, v, out): the key run looks up (plans._call_key after prefix)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastlaunch_module = {
    PyModuleDef_HEAD_INIT, "nbflash._fastlaunch", "Prepared kernel launches in C (see launch.Bound.fixed).", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastlaunch(void) {
    if (PyType_Ready(&PreparedLaunchType) < 0)
        return NULL;
    struct { PyObject **slot; const char *name; } names[] = {
        {&s_data, "data"}, {&s_ptr, "ptr"}, {&s_shape, "shape"}, {&s_c_contiguous, "_c_contiguous"},
        {&s_strides, "strides"}, {&s_dtype, "dtype"}, {&s_device_id, "device_id"}, {&s_go, "go"}, {&s_ov, "ov"},
        {&s_out_shape, "out_shape"}, {&s_overlap_error, "overlap_error"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].slot == NULL && (*names[i].slot = PyUnicode_InternFromString(names[i].name)) == NULL)
            return NULL;
    }
    PyObject *module = PyModule_Create(&fastlaunch_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&PreparedLaunchType);
    if (PyModule_AddObject(module, "PreparedLaunch", (PyObject *)&PreparedLaunchType) < 0) {
        Py_DECREF(&PreparedLaunchType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
