"""The run seed drives flow initialisation, permutations and data order together."""

from __future__ import annotations

import pytest
import torch

from harness.config import RunSettings, RunSpec
from harness.errors import ConfigError
from harness.train import Trainer, seed_everything
from methods import build_model

# Small configurations of every method, with the feature channels they are built for.
SMALL = {
    "msflow": ({"backbone": "resnet18.tv_in1k", "input_size": (64, 64)}, [8, 16, 32]),
    "cflow": ({"backbone": "resnet18.tv_in1k", "input_size": (64, 64), "cond_channels": 8}, [8, 16, 32]),
    "fastflow": ({"backbone": "resnet18", "input_size": (64, 64), "flow_steps": 2}, [64, 128, 256]),
    "csflow": ({"backbone": "tf_efficientnet_b0", "block_stage": 2, "input_size": (128, 128),
                "hidden_channels": 8}, [8, 8, 8]),
    "uflow": ({"backbone": "resnet18.tv_in1k", "input_size": (16, 16), "blocks_per_stage": 2}, [4, 8, 8]),
}


def initial_state(tmp_path, method: str, seed: int | None) -> tuple[int, dict[str, torch.Tensor]]:
    overrides, channels = SMALL[method]
    spec = RunSpec(method=method, data_root=tmp_path / "data", class_name="any", out_dir=tmp_path / "run",
                   overrides=overrides)
    trainer = Trainer(spec, RunSettings(device="cpu", seed=seed, tracking=False))
    return trainer.seed, build_model(trainer.config, channels).state_dict()


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", sorted(SMALL))
def test_run_seed_drives_initial_weights_and_permutations(tmp_path, method):
    seed_a, first = initial_state(tmp_path, method, 1)
    _, again = initial_state(tmp_path, method, 1)
    seed_b, other = initial_state(tmp_path, method, 2)
    assert (seed_a, seed_b) == (1, 2)
    assert same_state(first, again)
    assert not same_state(first, other)
    # the fixed permutations too, not only the trainable weights
    fixed = [k for k in first if "perm" in k]
    assert fixed and any(not torch.equal(first[k], other[k]) for k in fixed)


def test_no_run_seed_keeps_the_method_default(tmp_path):
    seed, state = initial_state(tmp_path, "msflow", None)
    assert seed == 9826
    assert same_state(state, initial_state(tmp_path, "msflow", 9826)[1])


def test_conflicting_seeds_are_an_error(tmp_path):
    spec = RunSpec(method="msflow", data_root=tmp_path / "data", class_name="any", out_dir=tmp_path / "run",
                   overrides={"seed": 3})
    with pytest.raises(ConfigError, match="seed=3 and the run seed 5"):
        Trainer(spec, RunSettings(device="cpu", seed=5, tracking=False))
    assert Trainer(spec, RunSettings(device="cpu", seed=3, tracking=False)).seed == 3


def test_data_order_follows_the_same_seed():
    orders = [torch.randperm(20, generator=seed_everything(s)) for s in (1, 1, 2)]
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])
