// Data-index builders for engine.data (pybind11 module engine.data._helpers).
//
// Same results, bit for bit, as the numpy reference in engine/data/index_builders.py, which is the
// specification; these exist because the sample index and the blending index are sequential loops
// that numpy cannot vectorise (blending) or does with several full-size temporaries (sample index).
//
//   build_sample_idx(sizes int32[D], doc_idx int32[L], seq_len, num_samples) -> int64[num_samples+1, 2]
//   permutation(n, seed) -> int64[n]
//   build_blending_indices(weights float64[K], size) -> (int16[size], int64[size])
//   build_batch_blending_indices(floor int64[K], rho int64[K], q, G, size, seed) -> (int16[size], int64[size])

// The blending loop compares w*i - count across datasets; a fused multiply-add would round differently
// from numpy, so contraction is switched off for this file.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// splitmix64: the same mixing function as index_builders._splitmix64 (numpy, uint64 wrap-around).
inline uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Sample i starts at stream position p = i*seq_len of the documents concatenated in doc_idx order;
// record (k, p - start_k) for the document k holding p (the last k whose start <= p, so empty
// documents are skipped). Sample i spans [p_i, p_{i+1}] inclusive: seq_len + 1 tokens.
py::array_t<int64_t> build_sample_idx(py::array_t<int32_t, py::array::c_style | py::array::forcecast> sizes,
                                      py::array_t<int32_t, py::array::c_style | py::array::forcecast> doc_idx,
                                      int64_t seq_len, int64_t num_samples) {
  if (seq_len <= 0) throw std::invalid_argument("build_sample_idx: seq_len must be > 0");
  if (num_samples < 0) throw std::invalid_argument("build_sample_idx: num_samples must be >= 0");
  const int32_t* sz = sizes.data();
  const int32_t* di = doc_idx.data();
  const int64_t n_docs = sizes.size();
  const int64_t n_idx = doc_idx.size();
  int64_t total = 0;
  for (int64_t k = 0; k < n_idx; ++k) {
    if (di[k] < 0 || di[k] >= n_docs)
      throw std::invalid_argument("build_sample_idx: doc_idx entry " + std::to_string(di[k]) +
                                  " out of range for " + std::to_string(n_docs) + " documents");
    total += sz[di[k]];
  }
  if (num_samples * seq_len + 1 > total)
    throw std::invalid_argument("build_sample_idx: " + std::to_string(num_samples) + " samples of " +
                                std::to_string(seq_len) + "+1 tokens need " +
                                std::to_string(num_samples * seq_len + 1) + " tokens, found " +
                                std::to_string(total));
  py::array_t<int64_t> out({num_samples + 1, (int64_t)2});
  int64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    int64_t k = 0, start = 0;  // current document (index into doc_idx) and its first stream position
    for (int64_t i = 0; i <= num_samples; ++i) {
      const int64_t p = i * seq_len;
      while (start + sz[di[k]] <= p) {
        start += sz[di[k]];
        ++k;
      }
      o[2 * i] = k;
      o[2 * i + 1] = p - start;
    }
  }
  return out;
}

// A seeded permutation of [0, n) in O(n): an 8-round Feistel network is a bijection on [0, 2^bits)
// (bits even, 2^bits >= n); "cycle walking" (apply it again while the value is >= n) turns it into a
// bijection on [0, n). Element i of the result is the image of i, so no sort and no extra memory.
// 8 rounds, not the classic 4: with tiny halves (n < 256) 4 rounds leave a measurable position bias.
constexpr int kRounds = 8;
struct Feistel {
  int half;
  uint64_t mask;
  uint64_t keys[kRounds];
  Feistel(int64_t n, uint64_t seed) {
    int bits = 2;
    while (bits < 64 && (uint64_t(1) << bits) < (uint64_t)n) bits += 2;
    half = bits / 2;
    mask = (uint64_t(1) << half) - 1;
    const uint64_t base = splitmix64(seed);
    for (int r = 0; r < kRounds; ++r) keys[r] = splitmix64(base + (uint64_t)r);
  }
  uint64_t operator()(uint64_t x) const {
    uint64_t l = x >> half, r = x & mask;
    for (int k = 0; k < kRounds; ++k) {
      const uint64_t t = l ^ (splitmix64(r ^ keys[k]) & mask);
      l = r;
      r = t;
    }
    return (l << half) | r;
  }
};

py::array_t<int64_t> permutation(int64_t n, uint64_t seed) {
  if (n < 0) throw std::invalid_argument("permutation: n must be >= 0");
  py::array_t<int64_t> out(n);
  int64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    const Feistel f(n, seed);
    for (int64_t i = 0; i < n; ++i) {
      uint64_t y = f((uint64_t)i);
      while (y >= (uint64_t)n) y = f(y);
      o[i] = (int64_t)y;
    }
  }
  return out;
}

// Greedy blending: sample i goes to the dataset furthest behind its share, argmax_k w_k*max(i,1) - count_k
// (first maximum wins). Every prefix of the result holds each dataset within about one sample of its share.
py::tuple build_blending_indices(py::array_t<double, py::array::c_style | py::array::forcecast> weights,
                                 int64_t size) {
  const int64_t K = weights.size();
  if (K <= 0 || K > 32767) throw std::invalid_argument("build_blending_indices: need 1..32767 weights");
  if (size < 0) throw std::invalid_argument("build_blending_indices: size must be >= 0");
  const double* w = weights.data();
  py::array_t<int16_t> ds(size);
  py::array_t<int64_t> ds_sample(size);
  int16_t* d = ds.mutable_data();
  int64_t* s = ds_sample.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> count(K, 0);
    for (int64_t i = 0; i < size; ++i) {
      const double x = i > 1 ? (double)i : 1.0;
      int64_t best = 0;
      double best_err = w[0] * x - (double)count[0];
      for (int64_t k = 1; k < K; ++k) {
        const double err = w[k] * x - (double)count[k];
        if (err > best_err) {
          best_err = err;
          best = k;
        }
      }
      d[i] = (int16_t)best;
      s[i] = count[best]++;
    }
  }
  return py::make_tuple(ds, ds_sample);
}

// Per-batch exact blending (engine/data/index_builders.py: build_batch_blending_indices_numpy is the
// specification). Batch b holds f_k + extra_k(b) samples of dataset k; the extras (R = sum(rho)/q per
// batch, dataset k at rate rho_k/q) are a PD2 Pfair schedule; slots laid out dataset by dataset are put in
// the order of permutation(G, seed + b). Integer arithmetic only: with q <= 2^30 and < 2^28 batches every
// product below stays under 2^62.
struct Pd2Key {
  int64_t d, nbbit, nD, k;
  bool operator<(const Pd2Key& o) const {
    if (d != o.d) return d < o.d;
    if (nbbit != o.nbbit) return nbbit < o.nbbit;
    if (nD != o.nD) return nD < o.nD;
    return k < o.k;
  }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }  // a >= 0, b > 0

inline Pd2Key pd2_key(int64_t e, int64_t rho, int64_t q, int64_t k) {
  const int64_t i = e + 1;
  const int64_t d = ceil_div(i * q, rho);
  const int64_t bbit = (i * q) % rho ? 1 : 0;
  int64_t D = 0;
  if (bbit && 2 * rho >= q) {
    const int64_t x = ceil_div(d * (q - rho), q);
    D = ceil_div(x * q, q - rho);
  }
  return Pd2Key{d, -bbit, -D, k};
}

py::tuple build_batch_blending_indices(py::array_t<int64_t, py::array::c_style | py::array::forcecast> floor_,
                                       py::array_t<int64_t, py::array::c_style | py::array::forcecast> rho_,
                                       int64_t q, int64_t G, int64_t size, uint64_t seed) {
  const int64_t K = floor_.size();
  if (K <= 0 || K > 32767 || rho_.size() != K)
    throw std::invalid_argument("build_batch_blending_indices: need 1..32767 datasets");
  if (size < 0 || G <= 0 || q <= 0 || q > (int64_t(1) << 30))
    throw std::invalid_argument("build_batch_blending_indices: need size >= 0, G > 0, 0 < q <= 2^30");
  const int64_t* f = floor_.data();
  const int64_t* rho = rho_.data();
  int64_t fsum = 0, rsum = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (f[k] < 0 || rho[k] < 0 || rho[k] >= q)
      throw std::invalid_argument("build_batch_blending_indices: expected f >= 0 and 0 <= rho < q");
    fsum += f[k];
    rsum += rho[k];
  }
  if (rsum % q != 0 || fsum + rsum / q != G)
    throw std::invalid_argument("build_batch_blending_indices: the quota does not make batches of G");
  const int64_t R = rsum / q;
  const int64_t n_batches = size / G + (size % G != 0);
  if (n_batches > (int64_t(1) << 28))
    throw std::invalid_argument("build_batch_blending_indices: more than 2^28 batches");
  py::array_t<int16_t> ds(size);
  py::array_t<int64_t> ds_sample(size);
  int16_t* d = ds.mutable_data();
  int64_t* s = ds_sample.mutable_data();
  bool short_of_tasks = false;
  {
    py::gil_scoped_release release;
    std::vector<int64_t> tasks, done(K, 0), count(K, 0), c(K);
    for (int64_t k = 0; k < K; ++k)
      if (rho[k] > 0) tasks.push_back(k);
    std::vector<Pd2Key> ready;
    std::vector<int16_t> labels(G);
    for (int64_t b = 0; b < n_batches && !short_of_tasks; ++b) {
      for (int64_t k = 0; k < K; ++k) c[k] = f[k];
      if (R > 0) {
        ready.clear();
        for (int64_t k : tasks)
          if (done[k] * q / rho[k] <= b) ready.push_back(pd2_key(done[k], rho[k], q, k));
        if ((int64_t)ready.size() < R) {
          short_of_tasks = true;
          break;
        }
        std::partial_sort(ready.begin(), ready.begin() + R, ready.end());
        for (int64_t j = 0; j < R; ++j) {
          ++c[ready[j].k];
          ++done[ready[j].k];
        }
      }
      int64_t slot = 0;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < c[k]; ++j) labels[slot++] = (int16_t)k;
      const Feistel perm(G, seed + (uint64_t)b);
      const int64_t start = b * G, stop = std::min(size, start + G);
      for (int64_t i = start; i < stop; ++i) {
        uint64_t y = perm((uint64_t)(i - start));
        while (y >= (uint64_t)G) y = perm(y);
        const int16_t k = labels[y];
        d[i] = k;
        s[i] = count[k]++;
      }
    }
  }
  if (short_of_tasks) throw std::runtime_error("build_batch_blending_indices: PD2 found too few eligible datasets");
  return py::make_tuple(ds, ds_sample);
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "Tessera data-index builders (C++); numpy reference: engine/data/index_builders.py";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_len"),
        py::arg("num_samples"));
  m.def("permutation", &permutation, py::arg("n"), py::arg("seed"));
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"));
  m.def("build_batch_blending_indices", &build_batch_blending_indices, py::arg("floor"), py::arg("rho"),
        py::arg("q"), py::arg("global_batch_size"), py::arg("size"), py::arg("seed"));
}
