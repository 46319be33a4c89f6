// The Python module medgrpo._C. It has no functions: importing it loads this shared
// library, whose static TORCH_LIBRARY_IMPL blocks (one per op file) register the CPU
// kernels of the medgrpo ops with the dispatcher. Plain CPython API, no pybind11, so
// this file compiles in a second.
#include <Python.h>

static PyMethodDef medgrpo_methods[] = {{nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef medgrpo_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Native CPU kernels of the medgrpo ops (registered on import).",
    -1,
    medgrpo_methods,
};

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&medgrpo_module);
}
