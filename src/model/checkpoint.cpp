#include "subllm/checkpoint.h"

#include <algorithm>
#include <cctype>
#include <filesystem>

#include "subllm/error.h"

namespace subllm {

namespace fs = std::filesystem;

namespace {

// The step in a folder name checkpoint-<digits>, or -1 for any other name (checkpoint-N.tmp
// of an unfinished save among them).
long long checkpoint_step(const std::string& name) {
  const std::string prefix = "checkpoint-";
  if (name.rfind(prefix, 0) != 0 || name.size() == prefix.size() || name.size() > prefix.size() + 18) return -1;
  for (size_t i = prefix.size(); i < name.size(); ++i)
    if (!std::isdigit((unsigned char)name[i])) return -1;
  return std::stoll(name.substr(prefix.size()));
}

}  // namespace

std::vector<std::string> list_checkpoints(const std::string& run) {
  std::vector<std::pair<long long, std::string>> found;
  if (!fs::is_directory(run)) return {};
  for (const auto& e : fs::directory_iterator(run)) {
    const long long step = checkpoint_step(e.path().filename().string());
    if (step >= 0 && e.is_directory() && fs::exists(e.path() / "trainer_state.json"))
      found.emplace_back(step, e.path().string());
  }
  // By the step in the name: checkpoint-100000000 follows checkpoint-99999999.
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& f : found) out.push_back(std::move(f.second));
  return out;
}

std::string find_checkpoint(const std::string& path) {
  check(fs::exists(path), "resume path '" + path + "' does not exist: pass a run folder or one of its checkpoint-N folders");
  if (fs::exists(fs::path(path) / "trainer_state.json")) return path;
  auto all = list_checkpoints(path);
  check(!all.empty(), "'" + path + "' holds no complete checkpoint (checkpoint-*/trainer_state.json)");
  return all.back();
}

}  // namespace subllm
