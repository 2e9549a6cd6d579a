#!/bin/sh
# Register the shared libraries that CUDA wheels (nvidia-* packages, pulled by onnxruntime-gpu's
# `cuda`/`cudnn` extras) install under site-packages, so that the dynamic loader finds them
# (ONNX Runtime's CUDA execution provider dlopens libcudart, libcudnn, ...). Without such wheels
# (CPU images) it does nothing.
set -eu
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d "$site/nvidia" ]; then
    find "$site/nvidia" -name 'lib*.so*' -exec dirname {} \; | sort -u > /etc/ld.so.conf.d/nvidia-wheels.conf
    ldconfig
    echo "registered CUDA wheel libraries: $(wc -l < /etc/ld.so.conf.d/nvidia-wheels.conf) folders"
fi
