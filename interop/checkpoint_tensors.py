"""Our model's tensors out of a saved training checkpoint (trainer/checkpoint.py), whole, by name,
a few at a time: what an HF export reads, whatever layout saved the checkpoint (DCP keeps each
tensor's full shape and reassembles it from every rank's chunks).

Reading goes through trainer/safe_dcp.py (no code from the files runs), after the manifest says
the checkpoint is complete; `verify` hashes this rank's share of the files first. Only the tensors
asked for are read, so memory holds what one `load` asks for, not the model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from moe.config import ModelConfig, require
from trainer.checkpoint_files import read_config, read_manifest, verify_checksums
from trainer.safe_dcp import SafeFileSystemReader, SafeLoadPlanner, read_dcp_metadata

MODEL_KEY = "model"  # the model's entry in the trainer's app_state (trainer/loop.py)


class CheckpointTensors:
    def __init__(self, path: str | Path, verify: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path)
        self.listed = set(manifest["files"])
        if verify and "checksums" in manifest:
            verify_checksums(self.path, manifest, sorted(manifest["files"])[rank::world_size])
        self.step = int(manifest["step"])
        self.run_config = read_config(self.path, manifest)
        metadata = read_dcp_metadata(self.path, self.listed)
        prefix = MODEL_KEY + "."
        self.entries = {key[len(prefix):]: md for key, md in metadata.state_dict_metadata.items()
                        if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)}  # fmt: skip

    def model_config(self) -> ModelConfig:
        """The model config the checkpoint's run used (its saved config.json)."""
        require(self.run_config is not None and isinstance(self.run_config.get("model"), dict),
                f"checkpoint {self.path} records no run config with a 'model' section (config.json), "
                f"so no model config to read its tensors with")  # fmt: skip
        schema = OmegaConf.structured(ModelConfig)
        cfg = OmegaConf.to_object(OmegaConf.merge(schema, self.run_config["model"]))
        cfg.validate()
        return cfg

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The whole tensors `names` (our parameter and buffer names), in their saved dtype, on CPU."""
        absent = [n for n in names if n not in self.entries]
        require(not absent, f"checkpoint {self.path} holds no model tensor {absent[:5]}")
        out = {n: torch.empty(tuple(self.entries[n].size), dtype=self.entries[n].properties.dtype) for n in names}
        with warnings.catch_warnings():
            # Without a process group DCP warns on every call; each rank reads on its own here.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({MODEL_KEY: out}, checkpoint_id=str(self.path), no_dist=True,
                     storage_reader=SafeFileSystemReader(self.path, self.listed),
                     planner=SafeLoadPlanner(self.path))  # fmt: skip
        return out
