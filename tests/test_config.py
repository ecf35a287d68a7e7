"""One list of what defines a run, and the key under which a sweep shares compiled programs."""
import dataclasses

import jax
import numpy as np
import pytest

import config
import parallel
import train
from device_data import Prepared
from errors import UsageError


def test_every_flag_either_defines_the_run_or_only_how_it_is_computed():
    fields = {f.name for f in dataclasses.fields(config.Config)}
    definition, computed = set(config.RUN_DEFINITION), set(config.HOW_COMPUTED)
    assert not definition & computed, "both"
    assert fields - definition - computed == set(), "neither"
    assert definition | computed == fields
    flags = {o[2:].replace("-", "_") for a in config.build_parser()._actions for o in a.option_strings
             if o.startswith("--")} - {"help"}
    assert flags == fields  # every flag is a field of the config, and the other way round


class Recording:
    """A config that notes every field read from it."""

    def __init__(self, wrapped):
        self._wrapped, self.read = wrapped, set()

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._wrapped, name)


@pytest.mark.parametrize("backend_choices", [dict(), dict(conv="xla", inner_loop="compiled", dtype="bfloat16")])
def test_the_program_key_covers_everything_build_programs_reads(backend_choices):
    images = np.zeros((jax.local_device_count(), 4, 8, 8, 3), np.uint8)  # (devices, per_device, 8, 8, 3)
    labels, mask = np.zeros(images.shape[:2], np.int32), np.ones(images.shape[:2], np.float32)
    batch = parallel.on_devices(images, labels, mask)
    prepared = Prepared(batch, batch, 32, 32, 1, 10)
    recording = Recording(config.Config(dataset="synthetic", channels=(4,), dense=4, **backend_choices))
    train.build_programs(recording, prepared)
    assert recording.read <= set(train.PROGRAM_FIELDS), recording.read - set(train.PROGRAM_FIELDS)
    assert set(train.PROGRAM_FIELDS) <= {f.name for f in dataclasses.fields(config.Config)}


def test_a_config_is_frozen_and_resolves_the_optimisers_default_rate():
    c = config.parse(["--optimiser", "sgd"])
    assert c.learning_rate == config.DEFAULT_LEARNING_RATES["sgd"] and c.channels == (32, 64, 128, 256)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seed = 3
    assert dataclasses.replace(c, seed=3).seed == 3
    with pytest.raises(UsageError, match="--weight-decay must be >= 0, got -0.1"):
        config.check(dataclasses.replace(c, weight_decay=-0.1))
