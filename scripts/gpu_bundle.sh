#!/usr/bin/env bash
# Builds the CUDA binaries here (for a GPU machine that cannot install our packages) and packs
# them, with the non-system libraries they load, into .gpu/subllm-gpu.tar.xz for
# scripts/gpu_check.sh (SUBLLM_GPU_BUNDLE=.gpu/subllm-gpu.tar.xz). Portable x86-64 code, CUDA
# code for sm_90 (Hopper) unless CUDA_ARCHS says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-gpu}
CUDA_ARCHS=${CUDA_ARCHS:-90}
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DSUBLLM_CUDA=ON -DSUBLLM_NATIVE=OFF \
  -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHS" >/dev/null
cmake --build "$BUILD_DIR" -j"$(nproc)" --target subllm subllm_tests bench_cuda_attention
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/lib"
for b in subllm subllm_tests bench_cuda_attention; do
  cp "$BUILD_DIR/$b" "$stage/bin/"
  strip "$stage/bin/$b"
done
# Libraries from our Debian packages (not the C runtime, not CUDA's: the GPU machine has those).
ldd "$stage"/bin/* | awk '/=> \// {print $3}' | sort -u | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|libstdc++.so*|libgcc_s.so*|libcud*|libcublas*) ;;
    *) cp -L "$lib" "$stage/lib/" ;;
  esac
done
mkdir -p .gpu
tar -C "$stage" -cJf .gpu/subllm-gpu.tar.xz bin lib
ls -la .gpu/subllm-gpu.tar.xz
