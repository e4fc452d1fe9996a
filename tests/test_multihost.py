"""Two processes on localhost form one 8-device CPU mesh (jax.distributed + gloo) and give the
single-process logits. Run as a script, this file is one of those processes."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import mimo_jax
from mimo_jax import sharding
from tests.fixtures import child_env, make_hf_model, save_hf_checkpoint

MODEL = dict(
    n_routed_experts=16,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_hidden_layers=2,
    layer_types=["sliding_attention", "full_attention"],
    mlp_layer_types=["dense", "sparse"],
)
IDS = np.random.RandomState(3).randint(0, 96, (2, 9))
MESHES = [dict(tensor=2, expert=4), dict(data=2, tensor=2, expert=2)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_one_mesh_equal_single_process(tmp_path):
    directory = save_hf_checkpoint(make_hf_model(seed=5, **MODEL), str(tmp_path / "ckpt"))
    single = mimo_jax.load_model(directory).logits(IDS)
    env = child_env(4, **{sharding.COORDINATOR_ENV: f"localhost:{_free_port()}", sharding.NUM_PROCESSES_ENV: "2"})
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, directory, str(tmp_path / f"out{pid}")],
            env={**env, sharding.PROCESS_ID_ENV: str(pid)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-process run timed out")
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    for pid in range(2):
        info = json.loads((tmp_path / f"out{pid}" / "info.json").read_text())
        assert info == {"process_index": pid, "process_count": 2, "device_count": 8, "local_device_count": 4}
        for m in range(len(MESHES)):
            ours = np.load(tmp_path / f"out{pid}" / f"logits{m}.npy")
            assert float(np.linalg.norm(ours - single) / np.linalg.norm(single)) < 1e-5


def test_initialize_distributed_configuration(monkeypatch):
    for name in (sharding.COORDINATOR_ENV, sharding.NUM_PROCESSES_ENV, sharding.PROCESS_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    assert sharding.initialize_distributed() is False  # nothing set: single host
    assert sharding.initialize_distributed(num_processes=1) is False
    with pytest.raises(ValueError, match="MIMO_PROCESS_ID"):
        sharding.initialize_distributed("localhost:1234", num_processes=2)
    monkeypatch.setenv(sharding.NUM_PROCESSES_ENV, "two")
    with pytest.raises(ValueError, match="MIMO_NUM_PROCESSES='two'"):
        sharding.initialize_distributed("localhost:1234", process_id=0)
    monkeypatch.setenv(sharding.NUM_PROCESSES_ENV, "2")
    monkeypatch.setenv(sharding.PROCESS_ID_ENV, "2")
    with pytest.raises(ValueError, match="outside"):
        sharding.initialize_distributed("localhost:1234")


def test_cli_flags_feed_initialize_distributed(monkeypatch):
    import argparse

    for name in (sharding.COORDINATOR_ENV, sharding.NUM_PROCESSES_ENV, sharding.PROCESS_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser()
    sharding.add_distributed_arguments(parser)
    args = parser.parse_args(["--coordinator-address", "10.0.0.1:1234", "--num-processes", "4", "--process-id", "3"])
    seen = {}
    monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda **kw: seen.update(kw))
    assert sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    assert seen == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3, local_device_ids=None)
    assert parser.parse_args([]).num_processes is None  # left out: the environment decides


def _worker(directory: str, out_dir: str) -> None:
    """One host of the two: join, load onto the global mesh, write the logits."""
    import jax

    sharding.initialize_distributed(cpu_collectives="gloo")
    os.makedirs(out_dir, exist_ok=True)
    info = dict(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        device_count=jax.device_count(),
        local_device_count=jax.local_device_count(),
    )
    with open(os.path.join(out_dir, "info.json"), "w") as f:
        json.dump(info, f)
    for m, sizes in enumerate(MESHES):
        logits = mimo_jax.load_model(directory, mesh=sharding.make_mesh(**sizes)).logits(IDS)
        np.save(os.path.join(out_dir, f"logits{m}.npy"), logits)
    jax.distributed.shutdown()


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
