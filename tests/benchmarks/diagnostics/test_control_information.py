"""benchmarks.diagnostics.control_information: what a control signal holds of each expression parameter."""

import pytest

from benchmarks.diagnostics.control_information import ControlInformation, measure


@pytest.mark.slow  # 12 s: the landmarks' semantics are also tested fast in tests/world/test_landmarks.py
def test_landmarks_hold_the_mouth_and_lids_but_no_gaze_which_the_parameter_vector_holds():
    record = measure(ControlInformation(renders=240, controls=["landmarks-exact", "parameter-vector"]))
    exact, params = record["controls"]["landmarks-exact"]["r2"], record["controls"]["parameter-vector"]["r2"]
    assert exact["smile"] > 0.8 and exact["mouth_open"] > 0.8 and exact["eye_open_l"] > 0.8
    assert exact["gaze_x"] < 0.2 and exact["gaze_y"] < 0.2  # no landmark moves with gaze
    assert params["gaze_x"] > exact["gaze_x"] + 0.3
    with pytest.raises(ValueError, match="unknown"):
        measure(ControlInformation(renders=30, controls=["nope"]))
