/*! \file
 *  \brief mamba_ssm's initialisation of a fresh model, with our portable RNG (so a seed
 *         gives the same weights everywhere):
 *           embedding ~ N(0, 0.02); an untied lm_head keeps nn.Linear's default U(+-1/sqrt(d_model))
 *           in_proj, x_proj: U(+-1/sqrt(fan_in)) (PyTorch's nn.Linear default, kaiming a=sqrt(5))
 *           out_proj: the same, then / sqrt(n_layer)   (rescale_prenorm_residual, n_residuals_per_layer = 1)
 *           conv1d weight, bias: U(+-1/sqrt(d_conv))  (nn.Conv1d default, fan_in = d_conv)
 *           dt_proj weight: U(+-dt_rank^-0.5) (dt_init "random", dt_scale 1)
 *           dt_proj bias: inverse softplus of dt, dt = exp(U(log 1e-3, log 1e-1)) floored at 1e-4
 *           A_log = log(1..d_state) per channel; D = 1; linear biases 0; norm weight 1, bias 0.
 */
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "mambabyte/decoding/sampling.hpp"  // Rng
#include "mambabyte/model/weights.hpp"

namespace mambabyte::train {

template <class T>
void initialize_mamba(ModelWeights<T>& w, std::uint64_t seed) {
  ModelConfig const& c = w.config();
  std::uint64_t stream = 0;
  for (ParamInfo const& p : w.parameters()) {
    Rng rng = Rng::stream(seed, stream++);  // one stream per tensor: adding a tensor shifts nothing else
    auto t = w.tensor(p);
    auto uniform = [&](double bound) {
      for (auto& x : t) x = static_cast<T>((2 * rng.uniform_double() - 1) * bound);
    };
    auto normal = [&](double sd) {  // Box-Muller on our own uniforms (portable)
      for (std::size_t i = 0; i < t.size(); i += 2) {
        double const u1 = 1.0 - rng.uniform_double(), u2 = rng.uniform_double();
        double const r = std::sqrt(-2 * std::log(u1)), a = 2 * 3.14159265358979323846 * u2;
        t[i] = static_cast<T>(sd * r * std::cos(a));
        if (i + 1 < t.size()) t[i + 1] = static_cast<T>(sd * r * std::sin(a));
      }
    };
    std::string const& n = p.name;
    double const fan_in = p.shape.size() >= 2 ? static_cast<double>(p.shape.back()) : 1.0;
    if (n == "backbone.embedding.weight") normal(0.02);
    else if (n == "lm_head.weight") uniform(1.0 / std::sqrt(fan_in));
    else if (n.ends_with("mixer.A_log"))
      for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<T>(std::log(double(i % c.d_state + 1)));
    else if (n.ends_with("mixer.D")) for (auto& x : t) x = T(1);
    else if (n.ends_with("dt_proj.weight")) uniform(std::pow(double(c.dt_rank), -0.5));
    else if (n.ends_with("dt_proj.bias"))
      for (auto& x : t) {
        double dt = std::exp(std::log(1e-3) + rng.uniform_double() * (std::log(1e-1) - std::log(1e-3)));
        dt = std::max(dt, 1e-4);
        x = static_cast<T>(dt + std::log(-std::expm1(-dt)));  // inverse softplus
      }
    else if (n.ends_with("conv1d.weight") || n.ends_with("conv1d.bias")) uniform(1.0 / std::sqrt(double(c.d_conv)));
    else if (n.ends_with("out_proj.weight")) uniform(1.0 / std::sqrt(fan_in) / std::sqrt(double(c.n_layer)));
    else if (n.ends_with("in_proj.weight") || n.ends_with("x_proj.weight")) uniform(1.0 / std::sqrt(fan_in));
    else if (n.ends_with("norm.weight") || n.ends_with("norm_f.weight")) for (auto& x : t) x = T(1);
    else if (n.ends_with(".bias")) for (auto& x : t) x = T(0);
    else fail("initialize_mamba: no rule for parameter '", n, "'");
  }
}

}  // namespace mambabyte::train
