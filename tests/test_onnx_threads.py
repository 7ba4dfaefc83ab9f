"""ONNX Runtime stays inside the cores the process was given (taskset here; a pod's CPU limit alike)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


def _heavy_graph(path: Path) -> Path:
    """uint8 NHWC images -> (softmax probabilities, embedding) through two 2048-wide matmuls: enough
    work per call that an intra-op pool would spread it over threads."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((3072, 2048)).astype(np.float32) / 50, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((2048, 2048)).astype(np.float32) / 50, "w2")
    shape = numpy_helper.from_array(np.array([-1, 3072], np.int64), "shape")
    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["f", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["embedding"]),
        helper.make_node("Softmax", ["embedding"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "heavy", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2048]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 2048])],
        initializer=[w1, w2, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to see a thread escape one")
def test_a_classifier_pinned_to_one_core_spends_at_most_one_core_of_cpu(tmp_path):
    # ORT's own default (intra_op_num_threads=0) pins a pool thread to every core of the machine, so a
    # process under `taskset -c 0` used to burn ~2 CPU-seconds per second on 2 cores.
    graph = _heavy_graph(tmp_path / "heavy.onnx")
    script = (
        "import sys, time, numpy as np\n"
        "from exporters.onnx_runtime import OnnxClassifier\n"
        "m = OnnxClassifier(sys.argv[1], prefer_gpu=False)\n"
        "x = np.zeros((64, 32, 32, 3), np.uint8)\n"
        "m.run(x)\n"
        "w, c = time.perf_counter(), time.process_time()\n"
        "for _ in range(20): m.run(x)\n"
        "print(m.session.get_session_options().intra_op_num_threads, (time.process_time() - c) / (time.perf_counter() - w))\n")
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", script, str(graph)], capture_output=True,
                         text=True, check=True, cwd=ROOT, timeout=120)
    threads, cpu_per_wall = out.stdout.split()
    assert int(threads) == 1
    # On one core CPU time cannot outrun wall time unless a thread runs elsewhere.
    assert float(cpu_per_wall) < 1.3, out.stdout
