// Temporary: replaced by the executor core.
namespace cir::sandbox { int core_version() { return 1; } }
