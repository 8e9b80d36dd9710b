// Calls g2tr::reduce and the stage ops through the dispatcher from C++, the way C++
// inference code uses the library (no Python anywhere), and checks the op contract.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace {

using ReduceFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef, double, int64_t, double);

int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::cerr << "FAILED: " << what << "\n";
  }
}

template <typename E>
void check_throws(const std::function<void()>& fn, const std::string& needle, const std::string& what) {
  try {
    fn();
  } catch (const E& e) {
    check(std::string(e.what()).find(needle) != std::string::npos, what + " (message: " + e.what() + ")");
    return;
  }
  check(false, what + " (no exception)");
}

}  // namespace

int main() {
  auto reduce = c10::Dispatcher::singleton().findSchemaOrThrow("g2tr::reduce", "").typed<ReduceFn>();
  torch::manual_seed(0);

  // Two packed images: BAGEL's 37x37 grid (K = round_half_even(684.5) = 684) and a 5x5 one
  // that min_keep = 32 keeps whole (K = min(N, 32) = 25).
  const std::vector<int64_t> grids = {37, 37, 5, 5}, anchor_grids = {16, 16, 3, 4};
  for (auto dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
    auto tokens = torch::randn({37 * 37 + 25, 48}).to(dtype);
    auto anchors = torch::randn({16 * 16 + 12, 48}).to(dtype);
    auto [merged, keep_idx, cu_seqlens, scores, assign] =
        reduce.call(tokens, anchors, grids, anchor_grids, 0.5, 32, 1.0);
    const std::string tag = std::string(" [") + c10::toString(dtype) + "]";
    check(merged.size(0) == 684 + 25 && merged.size(1) == 48 && merged.scalar_type() == dtype,
          "merged shape and dtype" + tag);
    check(
        cu_seqlens.scalar_type() == torch::kInt && cu_seqlens[1].item<int>() == 684 && cu_seqlens[2].item<int>() == 709,
        "cu_seqlens: 684, then min_keep = 32 capped at N = 25" + tag);
    check(scores.scalar_type() == torch::kFloat && scores.size(0) == tokens.size(0), "scores fp32 [N]" + tag);
    auto k0 = keep_idx.slice(0, 0, 684), k1 = keep_idx.slice(0, 684);
    check((k0.slice(0, 1) > k0.slice(0, 0, -1)).all().item<bool>() && k0.max().item<int64_t>() < 37 * 37,
          "keep_idx ascending inside image 0" + tag);
    check(torch::equal(k1, torch::arange(37 * 37, 37 * 37 + 25)), "image 1 keeps all its tokens" + tag);
    check(torch::equal(assign.index_select(0, keep_idx), torch::arange(709)), "kept tokens map to their own row" + tag);
    check(assign.slice(0, 0, 37 * 37).max().item<int64_t>() < 684, "image 0 merges inside image 0" + tag);
    auto again = reduce.call(tokens, anchors, grids, anchor_grids, 0.5, 32, 1.0);
    check(torch::equal(std::get<0>(again), merged) && torch::equal(std::get<4>(again), assign), "deterministic" + tag);
  }

  // keep_ratio 1.0 is the identity.
  auto tokens = torch::randn({6 * 6, 16});
  auto anchors = torch::randn({3 * 3, 16});
  auto [merged, keep_idx, cu, scores, assign] = reduce.call(tokens, anchors, {6, 6}, {3, 3}, 1.0, 1, 1.0);
  check(torch::equal(merged, tokens) && torch::equal(keep_idx, torch::arange(36)), "keep_ratio 1.0 is the identity");

  // The stage ops compose to reduce.
  auto scores_op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("g2tr::anchor_scores", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                                                                 c10::IntArrayRef)>();
  auto [s, cells] = scores_op.call(tokens, anchors, {6, 6}, {3, 3});
  check(torch::equal(s, scores) && cells.max().item<int64_t>() == 8, "anchor_scores matches reduce's scores");

  // Bad input: a clear error naming the argument and the image.
  check_throws<c10::ValueError>([&] { reduce.call(tokens, anchors, {6, 0}, {3, 3}, 0.5, 32, 1.0); }, "grids of image 0",
                                "non-positive grid");
  check_throws<c10::ValueError>([&] { reduce.call(tokens, anchors, {6, 6}, {3, 3}, 0.0, 32, 1.0); }, "keep_ratio",
                                "keep_ratio 0");
  check_throws<c10::TypeError>(
      [&] { reduce.call(tokens.to(torch::kInt), anchors.to(torch::kInt), {6, 6}, {3, 3}, 0.5, 32, 1.0); },
      "tokens must be float32", "integer dtype");

  std::cout << passed << " passed, " << failed << " failed\n";
  return failed == 0 ? 0 : 1;
}
