"""Run APOC's OpenCL random-forest pixel classifier for ``bench_quality.py``.

APOC pins numpy < 2, which napari-pacseg's own stack (zarr >= 3) cannot share, so it runs in a
separate interpreter: ``python -m venv .apoc-venv && .apoc-venv/bin/pip install apoc
pocl-binary-distribution`` (pocl gives an OpenCL CPU device). Reads ``IN.npz`` (image,
scribbles), trains and predicts ``REPEATS`` times per feature set named (a fresh classifier
each time), writes ``OUT.npz``: the labels and the (train_s, predict_s) of every repeat. A name
``objects:SET`` runs APOC's ``ObjectSegmenter`` (scribble value 2 the objects) with feature set
SET instead: its labels are object ids (int32), under the key ``objects_SET``.

Usage: .apoc-venv/bin/python benchmarks/apoc_worker.py IN.npz OUT.npz REPEATS FEATURESET|objects:FEATURESET...
"""

import sys
import tempfile
import time
from pathlib import Path

import apoc
import numpy as np
import pyclesperanto_prototype as cle


def main() -> None:
    src, dst, repeats, *feature_sets = sys.argv[1:]
    # Prefer a PoCL build that knows this CPU (Debian's pocl-opencl-icd picks a kernel-library
    # variant; the PoCL bundled in pyopencl's wheel fails with "unknown target CPU 'generic'"
    # on CPUs newer than its LLVM).
    for platform in __import__("pyopencl").get_platforms():
        if "debian" in platform.version.lower() or "DISTRO" in platform.version:
            cle.select_device(platform.get_devices()[0].name)
            break
    print(f"apoc on {cle.get_device()}", file=sys.stderr)
    data = np.load(src)
    image, scribbles = data["image"].astype(np.float32), data["scribbles"]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in feature_sets:
            objects = name.startswith("objects:")
            set_name = name.split(":", 1)[1] if objects else name
            key = name.replace(":", "_")
            features = apoc.PredefinedFeatureSet[set_name].value
            times = []
            for i in range(int(repeats)):
                cl_file = str(Path(tmp) / f"{key}_{i}.cl")
                clf = (
                    apoc.ObjectSegmenter(opencl_filename=cl_file, positive_class_identifier=2)
                    if objects
                    else apoc.PixelClassifier(opencl_filename=cl_file)
                )
                start = time.perf_counter()
                clf.train(features, scribbles, image)
                trained = time.perf_counter()
                labels = np.asarray(clf.predict(image=image))
                done = time.perf_counter()
                times.append([trained - start, done - trained])
            out[f"{key}_labels"] = labels.astype(np.int32 if objects else np.uint8)
            out[f"{key}_times"] = np.array(times)
    np.savez_compressed(dst, **out)


if __name__ == "__main__":
    main()
