// The MambaByte-353M shape of the CUDA model benchmarks (REFERENCE.md section 0): d_model 1024,
// 53 layers, d_state 16, d_conv 4, expand 2, LayerNorm, untied head, 256-byte vocabulary.
// `quick`: a 2-layer d_model 128 model of the same kind (ctest's --quick runs).
#pragma once

#include <mambabyte/mambabyte.hpp>

namespace mambabyte::bench {

inline ModelConfig mambabyte_353m(bool quick = false) {
  ModelConfig c;
  c.d_model = quick ? 128 : 1024;
  c.n_layer = quick ? 2 : 53;
  c.d_state = 16;
  c.d_conv = 4;
  c.expand = 2;
  c.rms_norm = false;
  c.tie_embeddings = false;
  c.vocab_size = 256;
  c.pad_vocab_size_multiple = 1;
  c.finalize();
  return c;
}

}  // namespace mambabyte::bench
