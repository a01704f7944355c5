"""Where the network runs: torch, ONNX Runtime or OpenVINO, in fp32 or bf16 (fp16 on GPUs).

Each runtime takes a normalized NCHW float32 batch and returns the head outputs as torch
tensors (`cls_logits`, `bbox_regression`, `objectness`), which `retinanet.postprocess.
DetectionDecoder` turns into detections: one post-processing for every runtime. No Ray here.

Measured on a 2-core AMD EPYC (Zen 4, AVX-512 BF16), R50-FPN at 800 px (README "Deploy"): torch
bf16 (autocast + channels_last) runs the network 1.8x and OpenVINO's bf16 hint 3.1x as fast as
torch fp32, so bf16 is worth having on CPUs too, not only on GPUs.
"""
from __future__ import annotations

import importlib.util
import platform
import sys
from dataclasses import dataclass

RUNTIMES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "fp16")


class RuntimeUnavailable(ValueError):
    """A runtime or precision this machine cannot give (a user error on the driver)."""


def module_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def require_module(name: str, purpose: str) -> None:
    if not module_installed(name):
        raise RuntimeUnavailable(f"{purpose} needs the {name} package, which is not installed: "
                                 f"pip install '{name}' (or the project's [deploy] extra)")


def cpu_has_bf16() -> bool:
    """bf16 arithmetic in the instruction set (AVX512_BF16 or AMX on x86, BF16 on Arm).

    Without it torch and OpenVINO emulate bf16 through fp32 conversions: slower than fp32 and
    no more accurate, so nobody should get it by accident.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().replace("\t", " ").split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def check_precision(runtime: str, precision: str, use_gpu: bool, cpu_local: bool = True) -> None:
    """RuntimeUnavailable for a runtime x precision x device that cannot run as asked.

    `cpu_local`: the network runs on this machine's CPU, so its instruction set can be checked
    here; on a cluster each detector checks its own node (`load_network`).
    """
    if runtime not in RUNTIMES:
        raise RuntimeUnavailable(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise RuntimeUnavailable(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if runtime != "torch":
        require_module(runtime, f"runtime {runtime}")
        require_module("onnx", f"runtime {runtime}")  # reads exported files, exports checkpoints
        if use_gpu:
            raise RuntimeUnavailable(f"runtime {runtime} runs on CPUs here; on GPUs use the torch runtime "
                                     "(or build a TensorRT engine from the exported file: cluster/README.md)")
    if runtime == "onnxruntime" and precision != "fp32":
        raise RuntimeUnavailable("runtime onnxruntime runs fp32 only; use --precision fp32, or openvino/torch for bf16")
    if precision == "fp16" and not use_gpu:
        raise RuntimeUnavailable("precision fp16 runs on GPUs only; on CPUs use bf16 (or fp32)")
    if precision == "bf16" and not use_gpu and cpu_local and not cpu_has_bf16():
        raise RuntimeUnavailable("precision bf16: this CPU has no bf16 instructions (AVX512_BF16/AMX), where bf16 "
                                 "is slower than fp32; use --precision fp32")


@dataclass
class LoadedNetwork:
    """A runnable network and what post-processing needs to know of it."""

    run: object  # callable: normalized float32 NCHW torch tensor -> head outputs dict
    config: object  # retinanet.RetinaNetConfig
    categories: list[dict]
    channels_last: bool = False  # the input's preferred memory layout


class TorchNetwork:
    """The eager network; bf16/fp16 through autocast, channels_last where it pays (GPUs, and
    CPUs in bf16, whose oneDNN kernels are fastest in NHWC)."""

    def __init__(self, model, device, precision: str):
        import torch

        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.channels_last = device.type == "cuda" or self.dtype is not None
        model = model.to(device).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.device = model, device

    def __call__(self, images):
        import torch

        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.model.network(images)


class OnnxRuntimeNetwork:
    def __init__(self, onnx_bytes: bytes, outputs: list[str], threads: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self.outputs = outputs

    def __call__(self, images):
        import torch

        values = self.session.run(self.outputs, {"images": images.numpy()})
        return _outputs_dict(self.outputs, [torch.from_numpy(v) for v in values])


class OpenVinoNetwork:
    """OpenVINO's CPU plugin on the ONNX graph; bf16 through its inference precision hint
    (weights and activations in bf16, accumulation in fp32), dynamic shapes kept."""

    def __init__(self, onnx_bytes: bytes, outputs: list[str], threads: int | None, precision: str):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(onnx_bytes)  # bytes: the ONNX front end, no temporary file
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.outputs = outputs
        self.ports = [self.compiled.output(name) for name in outputs]

    def __call__(self, images):
        import numpy as np
        import torch

        result = self.request.infer({"images": images.numpy()})
        # Copies: the request's output buffers are reused by its next call.
        return _outputs_dict(self.outputs, [torch.from_numpy(np.array(result[p], copy=True)) for p in self.ports])


def _outputs_dict(names: list[str], values: list) -> dict:
    out = dict(zip(names, values))
    out.setdefault("objectness", None)
    return out


def load_network(model_bytes: bytes, runtime: str, precision: str, *, use_gpu: bool = False,
                 threads: int | None = None) -> LoadedNetwork:
    """A checkpoint (torch runtime) or an exported ONNX file (any runtime) -> LoadedNetwork.

    A checkpoint asked to run under ONNX Runtime or OpenVINO is exported here first (the graph
    `jobs.export` writes, checked there); an ONNX file cannot run under torch.
    """
    import torch

    import retinanet
    from retinanet import export

    device = torch.device("cuda" if use_gpu else "cpu")
    if precision == "bf16" and not use_gpu and not cpu_has_bf16():
        print(f"warning: precision bf16: the CPU of {platform.node()} has no bf16 instructions (AVX512_BF16/AMX); "
              "its detector runs fp32", file=sys.stderr, flush=True)
        precision = "fp32"
    if threads and not use_gpu:
        torch.set_num_threads(threads)
    if export.is_onnx(model_bytes):
        meta = export.read_metadata(model_bytes)
        config = retinanet.RetinaNetConfig.from_dict(meta["config"])
        categories, onnx_bytes = meta["categories"], model_bytes
        if runtime == "torch":
            raise RuntimeUnavailable("an exported ONNX file runs under --runtime onnxruntime or openvino; "
                                     "for torch give the checkpoint it was exported from")
    else:
        model, _ = retinanet.load_checkpoint(model_bytes)
        config, categories = model.config, model.categories
        if runtime == "torch":
            network = TorchNetwork(model, device, precision)
            return LoadedNetwork(network, config, categories, network.channels_last)
        onnx_bytes = export.export_onnx(model, source="")
    outputs = export.output_names(config)
    if runtime == "onnxruntime":
        return LoadedNetwork(OnnxRuntimeNetwork(onnx_bytes, outputs, threads), config, categories)
    return LoadedNetwork(OpenVinoNetwork(onnx_bytes, outputs, threads, precision), config, categories)


def default_runtime(use_gpu: bool, precision: str | None) -> tuple[str, str]:
    """(runtime, precision) for what the user left out (README "Deploy" has the figures).

    fp32 unless asked otherwise, so that no flag means the detections of the eager model. On
    GPUs torch (cuDNN). On CPUs the fastest installed runtime for the precision: ONNX Runtime
    for fp32 (2.8x torch's network at 800 px on a 2-core Zen 4, same outputs within 2e-6),
    OpenVINO for bf16 (4.0x), torch where neither is installed.
    """
    precision = precision or "fp32"
    if use_gpu:
        return "torch", precision
    order = ("onnxruntime", "openvino") if precision == "fp32" else ("openvino",)
    return next((r for r in order if module_installed(r)), "torch"), precision


__all__ = ["PRECISIONS", "RUNTIMES", "LoadedNetwork", "RuntimeUnavailable", "check_precision", "cpu_has_bf16",
           "default_runtime", "load_network", "module_installed", "require_module"]
