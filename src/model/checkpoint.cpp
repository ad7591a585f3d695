#include "subllm/checkpoint.h"

#include <algorithm>
#include <filesystem>

#include "subllm/error.h"

namespace subllm {

namespace fs = std::filesystem;

std::vector<std::string> list_checkpoints(const std::string& run) {
  std::vector<std::string> out;
  if (!fs::is_directory(run)) return out;
  for (const auto& e : fs::directory_iterator(run)) {
    const std::string name = e.path().filename().string();
    if (e.is_directory() && name.rfind("checkpoint-", 0) == 0 && name.find(".tmp") == std::string::npos &&
        fs::exists(e.path() / "trainer_state.json"))
      out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string find_checkpoint(const std::string& path) {
  check(fs::exists(path), "resume path '" + path + "' does not exist");
  if (fs::exists(fs::path(path) / "trainer_state.json")) return path;
  auto all = list_checkpoints(path);
  check(!all.empty(), "'" + path + "' holds no complete checkpoint (checkpoint-*/trainer_state.json)");
  return all.back();
}

}  // namespace subllm
