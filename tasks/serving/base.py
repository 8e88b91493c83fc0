"""Typed vLLM arguments, replicas and the `Target` protocol every serving backend implements."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
KvCacheDtype = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
Quantization = Literal["awq", "gptq", "fp8", "bitsandbytes", "compressed-tensors"]
ReplicaState = Literal["starting", "up", "down", "restarting", "failed", "stopped"]


class VllmArgs(BaseModel):
    """Arguments of `vllm.entrypoints.openai.api_server`, rendered by `to_cli()`."""

    model: str = Field(description="Model dir (or hub id) the runtime loads.")
    served_model_name: str = Field(description="Name clients send as `model`.")
    max_model_len: int | None = Field(default=None, gt=0, description="Context length; None = model max.")
    dtype: Dtype = Field(default="auto", description="Weights/activations dtype; float32 on CPU.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    kv_cache_dtype: KvCacheDtype = "auto"
    quantization: Quantization | None = None
    enforce_eager: bool = Field(default=False, description="Skip graph capture / torch.compile (faster start).")
    max_num_seqs: int | None = Field(default=None, gt=0)
    enable_lora: bool = False
    lora_modules: dict[str, str] = Field(default_factory=dict, description="Adapter name -> adapter dir.")
    max_lora_rank: int | None = Field(default=None, gt=0)
    max_loras: int | None = Field(default=None, gt=0)
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    chat_template: str | None = Field(default=None, description="Path to a Jinja chat template.")
    extra_args: list[str] = Field(default_factory=list, description="Passed through verbatim, last.")

    def to_cli(self) -> list[str]:
        args = ["--model", self.model, "--served-model-name", self.served_model_name, "--dtype", self.dtype]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.tensor_parallel_size != 1:
            args += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.kv_cache_dtype != "auto":
            args += ["--kv-cache-dtype", self.kv_cache_dtype]
        if self.quantization:
            args += ["--quantization", self.quantization]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.max_num_seqs is not None:
            args += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.enable_lora or self.lora_modules:
            args.append("--enable-lora")
            if self.lora_modules:
                args += ["--lora-modules", *[f"{k}={v}" for k, v in sorted(self.lora_modules.items())]]
            if self.max_lora_rank is not None:
                args += ["--max-lora-rank", str(self.max_lora_rank)]
            if self.max_loras is not None:
                args += ["--max-loras", str(self.max_loras)]
        if self.enable_auto_tool_choice:
            args.append("--enable-auto-tool-choice")
        if self.tool_call_parser:
            args += ["--tool-call-parser", self.tool_call_parser]
        if self.chat_template:
            args += ["--chat-template", self.chat_template]
        return args + list(self.extra_args)


class Replica(BaseModel):
    """One running vLLM process (or pod) of a revision."""

    name: str
    target: str = "local"
    base_url: str = Field(description="OpenAI base URL, ending in /v1.")
    host: str
    port: int
    pid: int | None = None
    log_path: str | None = None
    state: ReplicaState = "starting"
    served_model_name: str
    kv_cache_tokens: int | None = Field(default=None, description="From vLLM's 'KV cache size: N tokens'.")
    max_concurrency: float | None = Field(default=None, description="vLLM's 'Maximum concurrency' at max_model_len.")
    startup_seconds: float | None = None
    started_at: datetime | None = None
    args: list[str] = Field(default_factory=list)
    gpus: list[int] = Field(default_factory=list, description="GPUs (NVML indices) a local replica was placed on.")

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"


@runtime_checkable
class Target(Protocol):
    """A place replicas run: a local process, later a Ray Serve app."""

    name: str

    def start(self, args: VllmArgs, *, name: str, env: dict[str, str] | None = None) -> Replica: ...

    def stop(self, replica: Replica) -> None: ...

    def status(self, replica: Replica) -> ReplicaState: ...

    def logs(self, replica: Replica, lines: int = 100) -> str: ...
