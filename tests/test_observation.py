"""The one observation validator: the server, the policy and the processor share its checks."""

from __future__ import annotations

import numpy as np
import pytest

from vla.observation import ObservationError, ObservationSpec, validate_observation

SPEC = ObservationSpec({"front": (8, 8), "wrist": (8, 8)}, state_dim=3)


def obs(**edit):
    o = {"images": {"front": np.zeros((8, 8, 3), np.uint8), "wrist": np.ones((8, 8, 3), np.uint8)},
         "state": np.arange(3, dtype=np.float64)}
    o.update(edit)
    return o


def test_a_good_observation_comes_back_as_uint8_images_and_float32_state():
    out = validate_observation({**obs(), "extra": 1}, SPEC)
    assert set(out) == {"images", "state"} and out["state"].dtype == np.float32
    np.testing.assert_array_equal(out["state"], [0, 1, 2])
    assert out["images"]["wrist"].dtype == np.uint8 and out["images"]["wrist"].shape == (8, 8, 3)
    # lenient mode: extra cameras are dropped, lists become arrays
    more = validate_observation(obs(images={**obs()["images"], "top": np.zeros((4, 4, 3), np.uint8)},
                                    state=[0.0, 1.0, 2.0]), SPEC)
    assert set(more["images"]) == {"front", "wrist"}


@pytest.mark.parametrize("bad,strict,match", [
    ([1], False, r"obs 7: expected a map"),
    ({"images": {}}, False, r"obs 7: missing key 'state'"),
    (obs(images={"front": np.zeros((8, 8, 3), np.uint8)}), False, r"obs 7: missing camera 'wrist'"),
    (obs(images={**obs()["images"], "top": np.zeros((8, 8, 3), np.uint8)}), True,
     r"obs 7\['images'\]: expected cameras \['front', 'wrist'\], got \['front', 'top', 'wrist'\]"),
    (obs(images={**obs()["images"], "front": np.zeros((8, 8, 3), np.float32)}), False,
     r"obs 7\['images'\]\['front'\]: expected uint8\[8, 8, 3\], got float32\[8, 8, 3\]"),
    (obs(state=np.zeros(4)), False, r"obs 7\['state'\]: expected float32\[3\], got float64\[4\]"),
    (obs(state=[0.0, 1.0, 2.0]), True, r"obs 7\['state'\]: expected float32\[3\], got list"),
    (obs(state=np.array([0.0, np.nan, 0.0])), False, "NaN or inf"),
])
def test_bad_observations_name_where_what_was_expected_and_what_came(bad, strict, match):
    with pytest.raises(ObservationError, match=match):
        validate_observation(bad, SPEC, "obs 7", strict=strict)


def test_history_is_a_leading_time_axis():
    spec = ObservationSpec({"front": (8, 8)}, state_dim=3, n_obs_steps=2)
    single = {"images": {"front": np.zeros((8, 8, 3), np.uint8)}, "state": np.zeros(3, np.float32)}
    stacked = {"images": {"front": np.zeros((2, 8, 8, 3), np.uint8)}, "state": np.zeros((2, 3), np.float32)}
    assert validate_observation(single, spec)["state"].shape == (3,)
    assert validate_observation(stacked, spec)["state"].shape == (2, 3)
    with pytest.raises(ObservationError, match=r"expected uint8\[2, 8, 8, 3\]"):
        validate_observation(single, spec, stacked=True)
