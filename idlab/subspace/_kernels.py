"""The compiled CPU fast path: an in-place Walsh-Hadamard transform and the fused Fastfood
block passes, built once with `torch.utils.cpp_extension.load_inline` (gcc + ninja).

Nothing here is called directly: `idlab.subspace.hadamard` decides whether the fast path is used
(`idlab.subspace.hadamard.backend()`), and `idlab.subspace.fastfood` calls these functions only through it.
The plain-torch code in those modules is the reference every kernel is tested against.

Kernels (CPU, contiguous float32 / float64 tensors, OpenMP over 2+ threads where it pays):

- ``wht_(x)``: H_n on every row of x (R, n) in place, n a power of two. Stages with
  h < 2^14 run inside 64 KiB blocks (cache-resident), the rest as radix-4 passes.
- ``ff_expand(u, z, k, keys..., table, accumulate)``: z_i (+)= G_i * u[Pi(i) & (c - 1)] for
  i < n = 2^k, with Pi and G computed from the block's keys (see `idlab.subspace.fastfood` for the
  hash; the kernel and the torch code compute the same integers).
- ``ff_bin(z, c, k, keys..., table)``: bins_t = sum_{i : Pi(i) & (c-1) = t} G_i z_i (c,), summed
  in 16 fixed segments whose partial sums are added in order (deterministic for any thread
  count).
- ``ff_expand_multi(u, z, k, keys, table)`` / ``ff_bin_multi(z, c, k, keys, table)``: the same for all
  q blocks of a piece in one call (keys (q, 6) int64), bit-identical to q single calls; tiny passes
  run on the calling thread (no OpenMP team: its wake-up dominates small pieces on a busy machine).
- ``ff_gsq(k, kg, table)``: sum_i G_i^2 over i < 2^k, in float64.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from types import ModuleType

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <cstdint>
#include <vector>

namespace {

template <typename T>
inline void wht_small(T* __restrict y, int64_t n) {
  int64_t h = 1;
  if (n >= 8) {
    for (int64_t i = 0; i < n; i += 8) {
      T a0 = y[i], a1 = y[i + 1], a2 = y[i + 2], a3 = y[i + 3];
      T a4 = y[i + 4], a5 = y[i + 5], a6 = y[i + 6], a7 = y[i + 7];
      T b0 = a0 + a1, b1 = a0 - a1, b2 = a2 + a3, b3 = a2 - a3;
      T b4 = a4 + a5, b5 = a4 - a5, b6 = a6 + a7, b7 = a6 - a7;
      T c0 = b0 + b2, c2 = b0 - b2, c1 = b1 + b3, c3 = b1 - b3;
      T c4 = b4 + b6, c6 = b4 - b6, c5 = b5 + b7, c7 = b5 - b7;
      y[i] = c0 + c4; y[i + 4] = c0 - c4; y[i + 1] = c1 + c5; y[i + 5] = c1 - c5;
      y[i + 2] = c2 + c6; y[i + 6] = c2 - c6; y[i + 3] = c3 + c7; y[i + 7] = c3 - c7;
    }
    h = 8;
  }
  for (; 4 * h <= n; h *= 4) {
    for (int64_t i = 0; i < n; i += 4 * h) {
      T* __restrict p0 = y + i; T* __restrict p1 = p0 + h; T* __restrict p2 = p1 + h; T* __restrict p3 = p2 + h;
      for (int64_t j = 0; j < h; ++j) {
        T a = p0[j], b = p1[j], c = p2[j], d = p3[j];
        T s0 = a + b, d0 = a - b, s1 = c + d, d1 = c - d;
        p0[j] = s0 + s1; p1[j] = d0 + d1; p2[j] = s0 - s1; p3[j] = d0 - d1;
      }
    }
  }
  for (; h < n; h *= 2) {
    for (int64_t i = 0; i < n; i += 2 * h) {
      T* __restrict p0 = y + i; T* __restrict p1 = p0 + h;
      for (int64_t j = 0; j < h; ++j) { T a = p0[j], b = p1[j]; p0[j] = a + b; p1[j] = a - b; }
    }
  }
}

template <typename T>
void wht_row(T* x, int64_t n) {
  const int64_t B = n < (int64_t(1) << 14) ? n : (int64_t(1) << 14);
  const int64_t nb = n / B;
  #pragma omp parallel for schedule(static) if (nb > 1)
  for (int64_t k = 0; k < nb; ++k) wht_small(x + k * B, B);
  int64_t h = B;
  const int64_t JB = 2048;  // inner span per task
  for (; 4 * h <= n; h *= 4) {
    const int64_t groups = n / (4 * h), spans = (h + JB - 1) / JB;
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < groups * spans; ++t) {
      const int64_t g = t / spans, j0 = (t % spans) * JB, j1 = j0 + JB < h ? j0 + JB : h;
      T* __restrict p0 = x + g * 4 * h; T* __restrict p1 = p0 + h; T* __restrict p2 = p1 + h; T* __restrict p3 = p2 + h;
      for (int64_t j = j0; j < j1; ++j) {
        T a = p0[j], b = p1[j], c = p2[j], d = p3[j];
        T s0 = a + b, d0 = a - b, s1 = c + d, d1 = c - d;
        p0[j] = s0 + s1; p1[j] = d0 + d1; p2[j] = s0 - s1; p3[j] = d0 - d1;
      }
    }
  }
  if (h < n) {
    const int64_t spans = (h + JB - 1) / JB;
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < spans; ++t) {
      const int64_t j0 = t * JB, j1 = j0 + JB < h ? j0 + JB : h;
      T* __restrict p0 = x; T* __restrict p1 = x + h;
      for (int64_t j = j0; j < j1; ++j) { T a = p0[j], b = p1[j]; p0[j] = a + b; p1[j] = a - b; }
    }
  }
}

struct Keys { uint32_t xk, a0, a1, ak, a2, kg; uint32_t mask; uint32_t r; };

inline uint32_t perm(uint32_t i, const Keys& k) {
  uint32_t x = (i ^ k.xk) & k.mask;
  x = (x * k.a0) & k.mask; x ^= x >> k.r;
  x = (x * k.a1) & k.mask; x ^= x >> k.r;
  x = (x + k.ak) & k.mask;
  x = (x * k.a2) & k.mask; x ^= x >> k.r;
  return x;
}

inline uint32_t ghash(uint32_t i, uint32_t kg) {
  uint32_t h = i * 0x9E3779B1u + kg;
  h = ((h >> 16) ^ h) * 0x045D9F3Bu;
  h = ((h >> 16) ^ h) * 0x045D9F3Bu;
  return (h >> 16) ^ h;
}

Keys make_keys(int64_t kbits, int64_t xk, int64_t a0, int64_t a1, int64_t ak, int64_t a2, int64_t kg) {
  Keys k;
  k.mask = kbits >= 32 ? 0xFFFFFFFFu : (uint32_t)((uint64_t(1) << kbits) - 1);
  k.r = kbits > 1 ? (uint32_t)((kbits + 1) / 2) : 1u;
  k.xk = (uint32_t)xk; k.a0 = (uint32_t)a0; k.a1 = (uint32_t)a1; k.ak = (uint32_t)ak;
  k.a2 = (uint32_t)a2; k.kg = (uint32_t)kg;
  return k;
}

constexpr int64_t TILE = 512;

// idx[t] = Pi(i0 + t) & cmask and gi[t] = h(i0 + t, kg) >> 20 for t < len (vectorisable: no gathers)
inline void hash_tile(uint32_t i0, int64_t len, const Keys& k, uint32_t cmask, uint32_t* __restrict idx,
                      uint32_t* __restrict gi) {
  for (int64_t t = 0; t < len; ++t) {
    const uint32_t ii = i0 + (uint32_t)t;
    idx[t] = perm(ii, k) & cmask;
    gi[t] = ghash(ii, k.kg) >> 20;
  }
}

template <typename T>
void expand_impl(const T* u, T* z, int64_t n, uint32_t cmask, const Keys& k, const float* tab, bool acc) {
  const int64_t tiles = (n + TILE - 1) / TILE;
  #pragma omp parallel for schedule(static) if (tiles > 1)
  for (int64_t tt = 0; tt < tiles; ++tt) {
    uint32_t idx[TILE], gi[TILE];
    const int64_t i0 = tt * TILE, len = n - i0 < TILE ? n - i0 : TILE;
    hash_tile((uint32_t)i0, len, k, cmask, idx, gi);
    T* __restrict zz = z + i0;
    if (acc) {
      for (int64_t t = 0; t < len; ++t) zz[t] += (T)tab[gi[t]] * u[idx[t]];
    } else {
      for (int64_t t = 0; t < len; ++t) zz[t] = (T)tab[gi[t]] * u[idx[t]];
    }
  }
}

template <typename T>
void bin_impl(const T* z, T* out, int64_t n, int64_t c, const Keys& k, const float* tab) {
  const int64_t S = n >= 16 * TILE ? 16 : 1, seg = n / S;
  std::vector<T> part((size_t)(S * c), T(0));
  const uint32_t cmask = (uint32_t)(c - 1);
  #pragma omp parallel for schedule(static) if (S > 1)
  for (int64_t s = 0; s < S; ++s) {
    T* __restrict p = part.data() + s * c;
    uint32_t idx[TILE], gi[TILE];
    for (int64_t i0 = s * seg; i0 < (s + 1) * seg; i0 += TILE) {
      const int64_t len = (s + 1) * seg - i0 < TILE ? (s + 1) * seg - i0 : TILE;
      hash_tile((uint32_t)i0, len, k, cmask, idx, gi);
      for (int64_t t = 0; t < len; ++t) p[idx[t]] += (T)tab[gi[t]] * z[i0 + t];
    }
  }
  for (int64_t t = 0; t < c; ++t) {
    T acc = T(0);
    for (int64_t s = 0; s < S; ++s) acc += part[s * c + t];
    out[t] = acc;
  }
}

// all q blocks of a piece in one call: z_i = sum_j G_j,i u_j[Pi_j(i) & (c - 1)], the same per-element
// order of additions as q calls of expand_impl (j = 0 assigns, then += in order): the same bits
template <typename T>
void expand_multi_impl(const T* u, int64_t c, T* z, int64_t n, const std::vector<Keys>& ks, const float* tab) {
  const int64_t tiles = (n + TILE - 1) / TILE, q = (int64_t)ks.size();
  const uint32_t cmask = (uint32_t)(c - 1);
  #pragma omp parallel for schedule(static) if (tiles > 1)
  for (int64_t tt = 0; tt < tiles; ++tt) {
    uint32_t idx[TILE], gi[TILE];
    const int64_t i0 = tt * TILE, len = n - i0 < TILE ? n - i0 : TILE;
    T* __restrict zz = z + i0;
    for (int64_t j = 0; j < q; ++j) {
      hash_tile((uint32_t)i0, len, ks[j], cmask, idx, gi);
      const T* __restrict uj = u + j * c;
      if (j == 0) {
        for (int64_t t = 0; t < len; ++t) zz[t] = (T)tab[gi[t]] * uj[idx[t]];
      } else {
        for (int64_t t = 0; t < len; ++t) zz[t] += (T)tab[gi[t]] * uj[idx[t]];
      }
    }
  }
}

template <typename T>
void bin_multi_impl(const T* z, T* out, int64_t n, int64_t c, const std::vector<Keys>& ks, const float* tab) {
  const int64_t q = (int64_t)ks.size();
  const bool split = n >= 16 * TILE;  // bin_impl parallelises inside
  #pragma omp parallel for schedule(static) if (!split && q > 1 && q * n >= 8 * TILE)
  for (int64_t j = 0; j < q; ++j) bin_impl<T>(z, out + j * c, n, c, ks[j], tab);
}

std::vector<Keys> keys_of(const torch::Tensor& keys, int64_t kbits) {
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == 6 && keys.scalar_type() == torch::kInt64 && keys.is_contiguous()
              && keys.device().is_cpu(), "keys: a contiguous (q, 6) int64 CPU tensor");
  const int64_t* p = keys.data_ptr<int64_t>();
  std::vector<Keys> out;
  for (int64_t j = 0; j < keys.size(0); ++j)
    out.push_back(make_keys(kbits, p[6 * j], p[6 * j + 1], p[6 * j + 2], p[6 * j + 3], p[6 * j + 4], p[6 * j + 5]));
  return out;
}

}  // namespace

void wht_(torch::Tensor x) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), "wht_: needs a contiguous CPU tensor");
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  TORCH_CHECK(n > 0 && (n & (n - 1)) == 0, "wht_: last dimension must be a power of two");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "wht_", [&] {
    scalar_t* p = x.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) wht_row(p + r * n, n);
  });
}

void ff_expand(torch::Tensor u, torch::Tensor z, int64_t kbits, int64_t xk, int64_t a0, int64_t a1,
               int64_t ak, int64_t a2, int64_t kg, torch::Tensor table, bool accumulate) {
  TORCH_CHECK(u.is_contiguous() && z.is_contiguous() && table.is_contiguous(), "ff_expand: contiguous");
  TORCH_CHECK(u.scalar_type() == z.scalar_type(), "ff_expand: u and z dtypes differ");
  TORCH_CHECK(z.numel() == (int64_t(1) << kbits), "ff_expand: z must have 2^k entries");
  const Keys k = make_keys(kbits, xk, a0, a1, ak, a2, kg);
  const uint32_t cmask = (uint32_t)(u.numel() - 1);
  const float* tab = table.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ff_expand", [&] {
    expand_impl<scalar_t>(u.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), z.numel(), cmask, k, tab, accumulate);
  });
}

torch::Tensor ff_bin(torch::Tensor z, int64_t c, int64_t kbits, int64_t xk, int64_t a0, int64_t a1,
                     int64_t ak, int64_t a2, int64_t kg, torch::Tensor table) {
  TORCH_CHECK(z.is_contiguous() && table.is_contiguous(), "ff_bin: contiguous");
  TORCH_CHECK(z.numel() == (int64_t(1) << kbits), "ff_bin: z must have 2^k entries");
  const Keys k = make_keys(kbits, xk, a0, a1, ak, a2, kg);
  auto out = torch::empty({c}, z.options());
  const float* tab = table.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ff_bin", [&] {
    bin_impl<scalar_t>(z.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), z.numel(), c, k, tab);
  });
  return out;
}

void ff_expand_multi(torch::Tensor u, torch::Tensor z, int64_t kbits, torch::Tensor keys, torch::Tensor table) {
  TORCH_CHECK(u.is_contiguous() && z.is_contiguous() && table.is_contiguous() && u.dim() == 2, "ff_expand_multi: contiguous (q, c) u");
  TORCH_CHECK(u.scalar_type() == z.scalar_type(), "ff_expand_multi: u and z dtypes differ");
  TORCH_CHECK(z.numel() == (int64_t(1) << kbits), "ff_expand_multi: z must have 2^k entries");
  const std::vector<Keys> ks = keys_of(keys, kbits);
  TORCH_CHECK((int64_t)ks.size() == u.size(0) && !ks.empty(), "ff_expand_multi: one key row per row of u");
  const float* tab = table.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ff_expand_multi", [&] {
    expand_multi_impl<scalar_t>(u.data_ptr<scalar_t>(), u.size(1), z.data_ptr<scalar_t>(), z.numel(), ks, tab);
  });
}

// bins (q, c) of all q blocks in one call: row j is exactly ff_bin of block j (blocks run in parallel
// when each is too small to split)
torch::Tensor ff_bin_multi(torch::Tensor z, int64_t c, int64_t kbits, torch::Tensor keys, torch::Tensor table) {
  TORCH_CHECK(z.is_contiguous() && table.is_contiguous(), "ff_bin_multi: contiguous");
  TORCH_CHECK(z.numel() == (int64_t(1) << kbits), "ff_bin_multi: z must have 2^k entries");
  const std::vector<Keys> ks = keys_of(keys, kbits);
  const int64_t q = (int64_t)ks.size(), n = z.numel();
  TORCH_CHECK(q > 0, "ff_bin_multi: no keys");
  auto out = torch::empty({q, c}, z.options());
  const float* tab = table.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ff_bin_multi", [&] {
    bin_multi_impl<scalar_t>(z.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, c, ks, tab);
  });
  return out;
}

double ff_gsq(int64_t kbits, int64_t kg, torch::Tensor table) {
  const float* tab = table.data_ptr<float>();
  const int64_t n = int64_t(1) << kbits;
  double acc = 0.0;
  #pragma omp parallel for reduction(+:acc) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const double g = tab[ghash((uint32_t)i, (uint32_t)kg) >> 20];
    acc += g * g;
  }
  return acc;
}
"""

FUNCTIONS = ["wht_", "ff_expand", "ff_bin", "ff_expand_multi", "ff_bin_multi", "ff_gsq"]


def _cpu_signature() -> str:
    """The CPU model and flags (the module is built with -march=native, so it is per CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep) + platform.machine()


def source_hash() -> str:
    """A short hash of the kernel source and the CPU (the build folder and module name use it)."""
    return hashlib.sha256((CPP_SOURCE + _cpu_signature()).encode()).hexdigest()[:12]


def build_dir() -> Path:
    """Where the module is built and cached: $IDLAB_KERNEL_CACHE or ~/.cache/idlab/kernels."""
    root = os.environ.get("IDLAB_KERNEL_CACHE") or str(Path.home() / ".cache" / "idlab" / "kernels")
    return Path(root) / f"cpu_{source_hash()}"


def is_cached() -> bool:
    """Whether the compiled module for this source and CPU is already in `build_dir` (loading it takes
    about a second; building it about 30 s)."""
    return (build_dir() / f"idlab_cpu_{source_hash()}.so").is_file()


def build() -> ModuleType:
    """Compile (first call, about 25 s on 2 cores) or load the cached module; raises on failure."""
    from torch.utils.cpp_extension import load_inline

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    mod: ModuleType = load_inline(
        name=f"idlab_cpu_{source_hash()}",
        cpp_sources=CPP_SOURCE,
        functions=FUNCTIONS,
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        verbose=False,
    )
    return mod
