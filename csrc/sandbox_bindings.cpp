#include <nanobind/nanobind.h>
namespace cir::sandbox { int core_version(); }
NB_MODULE(_sandbox, m) { m.def("core_version", &cir::sandbox::core_version); }
