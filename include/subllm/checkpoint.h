#pragma once
// Checkpoint folders: a run folder holds checkpoint-NNNNNNNN/ folders, each complete once its
// trainer_state.json exists (config.json, model.safetensors, tokenizer.model,
// optimizer.safetensors and trainer_state.json).
#include <string>
#include <vector>

namespace subllm {

// The complete checkpoint folders of a run folder, oldest first (empty if there are none).
std::vector<std::string> list_checkpoints(const std::string& run);

// Folder of the newest checkpoint in a run folder (or `path` itself if it is one).
std::string find_checkpoint(const std::string& path);

}  // namespace subllm
