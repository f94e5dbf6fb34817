// The BPE model of a tokenizer.json, following tokenizers' BPE::merge_word and Word::merge_all
// so that ties and unknown characters come out the same.
#include <cstdio>
#include <queue>

#include "tokenizer_json/components.hpp"

namespace lema::trainer::tokenizer_json {

Bpe::Bpe(const nlohmann::json& model) {
  if (model.contains("dropout") && !model["dropout"].is_null() &&
      model["dropout"].get<double>() > 0.0) {
    throw Unsupported("BPE dropout (random segmentation)");
  }
  for (const auto& [token, id] : model.at("vocab").items()) {
    const auto i = id.get<std::uint32_t>();
    if (i >= kMaxId) throw Unsupported("vocab id " + std::to_string(i) + " of \"" + token + "\"");
    vocab_[token] = i;
    if (i >= id_to_token_.size()) id_to_token_.resize(std::size_t{i} + 1);
    id_to_token_[i] = token;
  }
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    const std::string unk = model["unk_token"].get<std::string>();
    const auto it = vocab_.find(unk);
    if (it == vocab_.end()) throw Unsupported("BPE unk_token \"" + unk + "\" is not in the vocab");
    unk_id_ = it->second;
  }
  if (model.contains("continuing_subword_prefix") && model["continuing_subword_prefix"].is_string()) {
    prefix_ = model["continuing_subword_prefix"].get<std::string>();
  }
  if (model.contains("end_of_word_suffix") && model["end_of_word_suffix"].is_string()) {
    suffix_ = model["end_of_word_suffix"].get<std::string>();
  }
  fuse_unk_ = model.value("fuse_unk", false);
  byte_fallback_ = model.value("byte_fallback", false);
  ignore_merges_ = model.value("ignore_merges", false);

  const auto& merges = model.at("merges");
  std::uint32_t rank = 0;
  for (const auto& m : merges) {
    std::string a;
    std::string b;
    if (m.is_string()) {  // "a b", the older layout
      const std::string line = m.get<std::string>();
      const auto space = line.find(' ');
      if (space == std::string::npos) throw Unsupported("merge \"" + line + "\" is not two tokens");
      a = line.substr(0, space);
      b = line.substr(space + 1);
    } else if (m.is_array() && m.size() == 2) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      throw Unsupported("merge " + m.dump() + " is not two tokens");
    }
    const auto ia = vocab_.find(a);
    const auto ib = vocab_.find(b);
    if (ia == vocab_.end() || ib == vocab_.end()) {
      throw Unsupported("merge \"" + a + " " + b + "\" names a token missing from the vocab");
    }
    const std::string merged =
        a + (prefix_.empty() || b.compare(0, prefix_.size(), prefix_) != 0 ? b : b.substr(prefix_.size()));
    const auto im = vocab_.find(merged);
    if (im == vocab_.end()) {
      throw Unsupported("merge \"" + a + " " + b + "\" makes \"" + merged +
                        "\", which the vocab lacks");
    }
    merges_[pair_key(ia->second, ib->second)] = Merge{rank++, im->second};  // later ones win
  }
}

std::optional<std::uint32_t> Bpe::token_to_id(const std::string& token) const {
  const auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* Bpe::id_to_token(std::uint32_t id) const {
  if (id >= id_to_token_.size() || id_to_token_[id].empty()) return nullptr;
  return &id_to_token_[id];
}

void Bpe::tokenize(const std::string& w, std::vector<std::uint32_t>& out) const {
  if (w.empty()) return;
  if (ignore_merges_) {
    if (const auto it = vocab_.find(w); it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  std::vector<std::uint32_t> word;
  std::int64_t unk = -1;  // a pending unknown id, which fuse_unk may extend
  for (std::size_t i = 0; i < w.size();) {
    const std::size_t n = char_len(w, i);
    std::string s = w.substr(i, n);
    if (i > 0) s = prefix_ + s;
    if (i + n >= w.size()) s += suffix_;
    i += n;
    if (const auto it = vocab_.find(s); it != vocab_.end()) {
      if (unk >= 0) word.push_back(static_cast<std::uint32_t>(unk));
      unk = -1;
      word.push_back(it->second);
      continue;
    }
    if (byte_fallback_) {
      std::vector<std::uint32_t> bytes;
      for (const char c : s) {
        char name[8];
        std::snprintf(name, sizeof name, "<0x%02X>", static_cast<unsigned char>(c));
        const auto it = vocab_.find(name);
        if (it == vocab_.end()) break;
        bytes.push_back(it->second);
      }
      if (bytes.size() == s.size()) {
        // As tokenizers does, a pending unknown is not written out before the bytes.
        word.insert(word.end(), bytes.begin(), bytes.end());
        continue;
      }
    }
    if (unk_id_) {
      if (unk >= 0 && fuse_unk_) continue;  // one unknown for the whole run
      if (unk >= 0) word.push_back(static_cast<std::uint32_t>(unk));
      unk = *unk_id_;
    }
    // Without an unk_token the character is dropped, as tokenizers drops it.
  }
  if (unk >= 0) word.push_back(static_cast<std::uint32_t>(unk));
  merge_all(word);
  out.insert(out.end(), word.begin(), word.end());
}

void Bpe::merge_all(std::vector<std::uint32_t>& ids) const {
  const std::size_t n = ids.size();
  if (n < 2) return;
  std::vector<std::ptrdiff_t> prev(n);
  std::vector<std::ptrdiff_t> next(n);
  std::vector<bool> alive(n, true);
  for (std::size_t i = 0; i < n; ++i) {
    prev[i] = static_cast<std::ptrdiff_t>(i) - 1;
    next[i] = i + 1 < n ? static_cast<std::ptrdiff_t>(i + 1) : -1;
  }
  struct Entry {
    std::uint32_t rank;
    std::size_t pos;
    std::uint32_t new_id;
    bool operator>(const Entry& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> queue;
  for (std::size_t i = 0; i + 1 < n; ++i) {
    if (const auto it = merges_.find(pair_key(ids[i], ids[i + 1])); it != merges_.end()) {
      queue.push({it->second.rank, i, it->second.new_id});
    }
  }
  while (!queue.empty()) {
    const Entry top = queue.top();
    queue.pop();
    if (!alive[top.pos] || next[top.pos] < 0) continue;
    const auto right = static_cast<std::size_t>(next[top.pos]);
    const auto it = merges_.find(pair_key(ids[top.pos], ids[right]));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;  // stale entry
    ids[top.pos] = top.new_id;
    alive[right] = false;
    next[top.pos] = next[right];
    if (next[right] >= 0) prev[static_cast<std::size_t>(next[right])] = static_cast<std::ptrdiff_t>(top.pos);
    if (prev[top.pos] >= 0) {
      const auto p = static_cast<std::size_t>(prev[top.pos]);
      if (const auto m = merges_.find(pair_key(ids[p], ids[top.pos])); m != merges_.end()) {
        queue.push({m->second.rank, p, m->second.new_id});
      }
    }
    if (next[top.pos] >= 0) {
      const auto q = static_cast<std::size_t>(next[top.pos]);
      if (const auto m = merges_.find(pair_key(ids[top.pos], ids[q])); m != merges_.end()) {
        queue.push({m->second.rank, top.pos, m->second.new_id});
      }
    }
  }
  std::size_t k = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (alive[i]) ids[k++] = ids[i];
  }
  ids.resize(k);
}

}  // namespace lema::trainer::tokenizer_json
