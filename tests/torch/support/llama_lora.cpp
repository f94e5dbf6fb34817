#include "llama_lora.hpp"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "lema/io/safetensors_writer.hpp"

namespace lema::test {
namespace {

std::string layer(std::int64_t i, const std::string& rest) {
  return "model.layers." + std::to_string(i) + "." + rest;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight) {
  const at::Tensor variance = x.pow(2).mean({-1}, /*keepdim=*/true);
  return x * at::rsqrt(variance + 1e-5) * weight;
}

/// Rotary embedding over [batch, heads, seq, head_dim], rotating halves.
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const std::int64_t half = x.size(-1) / 2;
  const at::Tensor x1 = x.narrow(-1, 0, half);
  const at::Tensor x2 = x.narrow(-1, half, half);
  const at::Tensor rotated = at::cat({-x2, x1}, -1);
  return x * cos + rotated * sin;
}

struct Adapter {
  at::Tensor a;  // [rank, hidden]
  at::Tensor b;  // [hidden, rank]
};

}  // namespace

Weights make_llama_weights(const LlamaConfig& c, std::uint64_t seed) {
  at::manual_seed(seed);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto matrix = [&](std::int64_t rows, std::int64_t cols) {
    return at::randn({rows, cols}, f32) / std::sqrt(static_cast<double>(cols));
  };
  Weights w;
  w["model.embed_tokens.weight"] = at::randn({c.vocab, c.hidden}, f32);
  for (std::int64_t i = 0; i < c.layers; ++i) {
    w[layer(i, "input_layernorm.weight")] = 1 + 0.1 * at::randn({c.hidden}, f32);
    for (const char* p : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
      w[layer(i, std::string("self_attn.") + p + ".weight")] = matrix(c.hidden, c.hidden);
    }
    w[layer(i, "post_attention_layernorm.weight")] = 1 + 0.1 * at::randn({c.hidden}, f32);
    w[layer(i, "mlp.gate_proj.weight")] = matrix(c.intermediate, c.hidden);
    w[layer(i, "mlp.up_proj.weight")] = matrix(c.intermediate, c.hidden);
    w[layer(i, "mlp.down_proj.weight")] = matrix(c.hidden, c.intermediate);
  }
  w["model.norm.weight"] = 1 + 0.1 * at::randn({c.hidden}, f32);
  w["lm_head.weight"] = matrix(c.vocab, c.hidden);
  return w;
}

std::uint64_t weight_bytes(const Weights& weights) {
  std::uint64_t total = 0;
  for (const auto& [name, t] : weights) total += t.nbytes();
  return total;
}

void write_weights(const std::filesystem::path& path, const Weights& weights) {
  std::vector<io::TensorToWrite> out;
  for (const auto& [name, tensor] : weights) {
    at::Tensor t = tensor.contiguous();
    out.push_back({name, io::Dtype::F32, t.sizes().vec(),
                   [t](std::span<std::byte> bytes, std::uint64_t offset) {
                     std::memcpy(bytes.data(), static_cast<const std::byte*>(t.data_ptr()) + offset,
                                 bytes.size());
                   }});
  }
  io::write_safetensors(path, std::move(out));
}

Weights read_weights_fully(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::uint64_t header_bytes = 0;
  in.read(reinterpret_cast<char*>(&header_bytes), 8);
  std::string header(header_bytes, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_bytes));
  const auto json = nlohmann::json::parse(header);
  Weights out;
  for (const auto& [name, entry] : json.items()) {
    if (name == "__metadata__") continue;
    if (entry.at("dtype") != "F32") throw std::runtime_error("only F32 is read here: " + name);
    const auto shape = entry.at("shape").get<std::vector<std::int64_t>>();
    const auto offsets = entry.at("data_offsets").get<std::vector<std::uint64_t>>();
    at::Tensor t = at::empty(shape, at::kFloat);
    in.seekg(static_cast<std::streamoff>(8 + header_bytes + offsets[0]));
    in.read(static_cast<char*>(t.data_ptr()),
            static_cast<std::streamsize>(offsets[1] - offsets[0]));
    out[name] = t;
  }
  return out;
}

TrainResult train_lora(const LlamaConfig& c, const Weights& frozen, int steps,
                       const std::function<void()>& after_step) {
  at::manual_seed(1234);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const std::int64_t head_dim = c.hidden / c.heads;
  auto w = [&](const std::string& name) -> const at::Tensor& { return frozen.at(name); };

  std::vector<Adapter> q_lora, v_lora;
  std::vector<at::Tensor> params;
  for (std::int64_t i = 0; i < c.layers; ++i) {
    for (auto* list : {&q_lora, &v_lora}) {
      Adapter a{(0.02 * at::randn({c.lora_rank, c.hidden}, f32)).requires_grad_(),
                (0.02 * at::randn({c.hidden, c.lora_rank}, f32)).requires_grad_()};
      params.push_back(a.a);
      params.push_back(a.b);
      list->push_back(a);
    }
  }
  const at::Tensor tokens = at::randint(c.vocab, {c.batch, c.seq + 1}, at::kLong);
  const at::Tensor input = tokens.narrow(1, 0, c.seq);
  const at::Tensor target = tokens.narrow(1, 1, c.seq).reshape({-1});

  // Rotary tables and the causal mask.
  const at::Tensor inv_freq =
      at::pow(10000.0, -at::arange(0, head_dim, 2, f32) / static_cast<double>(head_dim));
  const at::Tensor angles = at::outer(at::arange(c.seq, f32), inv_freq);
  const at::Tensor emb = at::cat({angles, angles}, -1);
  const at::Tensor cos = emb.cos(), sin = emb.sin();
  const at::Tensor mask = at::full({c.seq, c.seq}, -INFINITY, f32).triu(1);
  const double scale = 2.0;  // LoRA alpha / rank

  auto lora = [&](const at::Tensor& x, const Adapter& a) {
    return at::linear(at::linear(x, a.a), a.b) * scale;
  };
  auto split_heads = [&](const at::Tensor& x) {
    return x.view({c.batch, c.seq, c.heads, head_dim}).transpose(1, 2);
  };

  std::vector<at::Tensor> m(params.size()), v(params.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    m[i] = at::zeros_like(params[i]);
    v[i] = at::zeros_like(params[i]);
  }
  const double lr = 1e-2, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;

  TrainResult result;
  for (int step = 1; step <= steps; ++step) {
    at::Tensor h = at::embedding(w("model.embed_tokens.weight"), input);
    for (std::int64_t i = 0; i < c.layers; ++i) {
      const at::Tensor x = rms_norm(h, w(layer(i, "input_layernorm.weight")));
      const at::Tensor q =
          at::linear(x, w(layer(i, "self_attn.q_proj.weight"))) + lora(x, q_lora[i]);
      const at::Tensor k = at::linear(x, w(layer(i, "self_attn.k_proj.weight")));
      const at::Tensor val =
          at::linear(x, w(layer(i, "self_attn.v_proj.weight"))) + lora(x, v_lora[i]);
      const at::Tensor qh = rotary(split_heads(q), cos, sin);
      const at::Tensor kh = rotary(split_heads(k), cos, sin);
      const at::Tensor scores =
          at::matmul(qh, kh.transpose(-2, -1)) / std::sqrt(static_cast<double>(head_dim)) + mask;
      const at::Tensor attn = at::matmul(at::softmax(scores, -1), split_heads(val));
      const at::Tensor merged = attn.transpose(1, 2).reshape({c.batch, c.seq, c.hidden});
      h = h + at::linear(merged, w(layer(i, "self_attn.o_proj.weight")));
      const at::Tensor y = rms_norm(h, w(layer(i, "post_attention_layernorm.weight")));
      const at::Tensor gate = at::silu(at::linear(y, w(layer(i, "mlp.gate_proj.weight"))));
      const at::Tensor up = at::linear(y, w(layer(i, "mlp.up_proj.weight")));
      h = h + at::linear(gate * up, w(layer(i, "mlp.down_proj.weight")));
    }
    h = rms_norm(h, w("model.norm.weight"));
    const at::Tensor logits = at::linear(h, w("lm_head.weight")).reshape({-1, c.vocab});
    const at::Tensor loss = at::nll_loss(at::log_softmax(logits, -1), target);
    loss.backward();

    {
      c10::NoGradGuard no_grad;
      for (std::size_t i = 0; i < params.size(); ++i) {
        const at::Tensor g = params[i].grad();
        m[i].mul_(beta1).add_(g, 1 - beta1);
        v[i].mul_(beta2).addcmul_(g, g, 1 - beta2);
        const at::Tensor m_hat = m[i] / (1 - std::pow(beta1, step));
        const at::Tensor v_hat = v[i] / (1 - std::pow(beta2, step));
        params[i].sub_(lr * m_hat / (v_hat.sqrt() + eps));
        params[i].mutable_grad() = at::Tensor();
      }
    }
    result.losses.push_back(loss.detach().clone());
    if (after_step) after_step();
  }
  for (std::int64_t i = 0; i < c.layers; ++i) {
    result.adapters[layer(i, "q_lora.A")] = q_lora[i].a.detach().clone();
    result.adapters[layer(i, "q_lora.B")] = q_lora[i].b.detach().clone();
    result.adapters[layer(i, "v_lora.A")] = v_lora[i].a.detach().clone();
    result.adapters[layer(i, "v_lora.B")] = v_lora[i].b.detach().clone();
  }
  return result;
}

}  // namespace lema::test
