"""Plain-path loading of a checkpoint directory: config, sharded safetensors, model.

Memory: the model is built on the meta device, its parameters allocated once (``to_empty``), and
each tensor is read from its shard file straight into the parameter's memory (``readinto`` at the
offset the safetensors header gives). No shard is mmapped or held whole, so a load costs the
parameters plus at most one tensor (only when the checkpoint dtype differs from the model's).
The vLLM path uses vLLM's own weight iterator with the same ``load_weights`` layout.
``save_model`` writes the inverse (real key names, sharded), e.g. after training a demo model.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterator

import torch
from safetensors.torch import save_file

from vllm_dapd.models.configs import DreamConfig, LLaDA2MoeConfig, LLaDAConfig
from vllm_dapd.models.dream import Dream
from vllm_dapd.models.llada import LLaDA
from vllm_dapd.models.llada2 import LLaDA2
from vllm_dapd.models.transformer import DiffusionTransformer

MODEL_TYPES: dict[str, tuple[type, type]] = {"llada": (LLaDAConfig, LLaDA), "Dream": (DreamConfig, Dream),
                                             "llada2_moe": (LLaDA2MoeConfig, LLaDA2)}

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_config(path: str) -> LLaDAConfig | DreamConfig | LLaDA2MoeConfig:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type: {model_type!r} in {path}/config.json is not one of {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type][0].from_dict(raw)


def shard_files(path: str) -> list[str]:
    """Shard files in index order (``model.safetensors.index.json``) or the single file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return [single]


def iter_safetensors_header(file: str) -> Iterator[tuple[str, torch.dtype, tuple[int, ...], int, int]]:
    """(name, dtype, shape, absolute byte offset, byte length) of each tensor in a shard."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{name}: unsupported safetensors dtype {meta['dtype']} in {file}")
        begin, end = meta["data_offsets"]
        yield name, _ST_DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + begin, end - begin


def _read_into(f, target: torch.Tensor, dtype: torch.dtype, offset: int, length: int) -> None:
    f.seek(offset)
    direct = target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
    buf = target.data if direct else torch.empty(target.shape, dtype=dtype)
    view = buf.view(-1).view(torch.uint8).numpy()
    if f.readinto(view) != length:
        raise ValueError(f"truncated tensor data at byte {offset} of {f.name}")
    if not direct:
        with torch.no_grad():
            target.copy_(buf)


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
               ) -> DiffusionTransformer:
    """Plain PyTorch model from a checkpoint directory in the real LLaDA / Dream / LLaDA2 layout."""
    config = read_config(path)
    model_cls = MODEL_TYPES[config.model_type][1]
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to(dtype).to_empty(device=device)
    layout = model.checkpoint_layout()
    seen: set[str] = set()
    for file in shard_files(path):
        with open(file, "rb") as f:
            for name, st_dtype, shape, offset, length in iter_safetensors_header(file):
                slot = layout.get(name)
                if slot is None:
                    if name.endswith(model.ignored_checkpoint_keys):
                        continue
                    raise ValueError(f"{name}: unexpected checkpoint tensor for {model_cls.__name__}")
                if shape != slot.shape:
                    raise ValueError(f"{name}: expected shape {slot.shape}, checkpoint has {shape}")
                param = model.get_submodule(slot.module).param_for(slot.shard)
                _read_into(f, param, st_dtype, offset, length)
                seen.add(name)
    missing = sorted(set(layout) - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{missing[0]}: missing from the checkpoint at {path}{more}")
    return model.eval()


def write_shards(path: str, weights: dict[str, torch.Tensor], num_shards: int = 1) -> None:
    """Sharded safetensors + ``model.safetensors.index.json``, the Hugging Face layout."""
    names = sorted(weights)
    if not 1 <= num_shards <= len(names):
        raise ValueError(f"num_shards: need 1 .. {len(names)}, got {num_shards}")
    total = sum(weights[n].numel() * weights[n].element_size() for n in names)
    per = math.ceil(len(names) / num_shards)
    weight_map = {}
    for i in range(num_shards):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: weights[n].detach().cpu().contiguous() for n in names[i * per:(i + 1) * per]}
        save_file(part, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def save_model(model: DiffusionTransformer, path: str, num_shards: int = 1) -> str:
    """Write a plain model as a checkpoint in its real layout (config.json + shards); returns path.

    The tokenizer is saved separately (``tokenizer.save_pretrained(path)``).
    """
    if getattr(model.factory, "vllm", False):
        raise ValueError("model: save_model takes the plain PyTorch model, not the vLLM one")
    os.makedirs(path, exist_ok=True)
    weights = {name: model.get_submodule(slot.module).param_for(slot.shard)
               for name, slot in model.checkpoint_layout().items()}
    write_shards(path, weights, num_shards)
    model.config.to_json_file(os.path.join(path, "config.json"))
    return path


def check_checkpoint(path: str) -> list[str]:
    """Every layout problem of a checkpoint directory, read from headers only (no tensor data).

    Each entry names the key: missing, unexpected, or mis-shaped. Empty when ``load_model`` would
    load it. Cheap on an 8B checkpoint (the model is built on the meta device).
    """
    config = read_config(path)
    with torch.device("meta"):
        model = MODEL_TYPES[config.model_type][1](config)
    layout = model.checkpoint_layout()
    problems, seen = [], set()
    for file in shard_files(path):
        for name, _, shape, _, _ in iter_safetensors_header(file):
            slot = layout.get(name)
            if slot is None:
                if not name.endswith(model.ignored_checkpoint_keys):
                    problems.append(f"{name}: unexpected checkpoint tensor")
            elif shape != slot.shape:
                problems.append(f"{name}: expected shape {slot.shape}, checkpoint has {shape}")
            seen.add(name)
    problems += [f"{name}: missing from the checkpoint" for name in sorted(set(layout) - seen)]
    return problems
