#!/bin/sh
# Init container: make sure a TensorRT engine for this node's GPU exists in the shared cache, then copy it into the
# pod's own /run/engine, which the server reads (SNIPSERVE_MODELS_DIR). Engines are tied to the TensorRT version
# and the GPU's compute capability, and derive from one ONNX file: the cache key holds all three, so a new image,
# another GPU generation or a new model builds a new engine while the old ones stay for the pods that use them.
set -eu
onnx="${SOURCE_ONNX:-/models/snipserve_default.onnx}"
cache="${ENGINE_CACHE:-/engine-cache}"
key="$(python -c 'import tensorrt; from service.engines.tensorrt import device_identity; print(f"trt{tensorrt.__version__}-sm{device_identity()[1]}")')"
key="$key-$(sha256sum "$onnx" | cut -c1-16)"
dir="$cache/$key"
if [ ! -f "$dir/snipserve.engine" ]; then
    mkdir -p "$dir"
    tmp="$(mktemp -d "$dir/.build-XXXXXX")"
    snipserve export tensorrt --onnx "$onnx" --engine "$tmp/snipserve.engine" --precision fp16 --min-batch 1 --opt-batch 8 --max-batch 32 --timing-cache "$dir/timing.cache"
    # The engine is moved last: where it exists, its manifest does too (pods building at once: the last mv wins).
    mv "$tmp/snipserve.manifest.json" "$dir/snipserve.manifest.json"
    mv "$tmp/snipserve.engine" "$dir/snipserve.engine"
    rm -rf "$tmp"
fi
cp "$dir/snipserve.engine" "$dir/snipserve.manifest.json" /run/engine/
echo "engine $key ready"
