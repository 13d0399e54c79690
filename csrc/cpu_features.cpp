// CPU-feature dispatch: whether the half-precision tile GEMMs run on this CPU (see cpu_features.h).

#include "cpu_features.h"

#include <ATen/cpu/Utils.h>

#include <cstdlib>
#include <string>

namespace nonlocal_ext {
namespace cpu {

bool half_gemm_available(at::ScalarType dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  if (const char* forced = std::getenv("NONLOCAL_EXT_CPU_HALF_GEMMS")) {
    if (std::string(forced) == "0") return false;
    if (std::string(forced) == "1") return true;
  }
  static const auto caps = at::cpu::get_cpu_capabilities();
  const auto has = [&](const char* name) {
    const auto it = caps.find(name);
    return it != caps.end() && it->second.isBool() && it->second.toBool();
  };
  if (dtype == at::kBFloat16) return has("avx512_bf16") || has("amx_bf16");
  if (dtype == at::kHalf) return has("avx512_fp16") || has("amx_fp16");
  return false;
}

}  // namespace cpu
}  // namespace nonlocal_ext
