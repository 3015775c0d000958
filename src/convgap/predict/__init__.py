"""Latency prediction: a model's latency on this device from its operators' shapes,
calibrated on random networks profiled on the device (:func:`calibrate`), without running
the model (:func:`predict_latency`); :func:`profile` times each operator inside a real run
(what predictions are checked against). Seconds throughout."""

from .calibration import Calibration, calibrate, load
from .latency import PredictedRow, Prediction, predict_latency
from .profile import measure, profile
from .record import Op, TensorSpec, record, replay

__all__ = ["calibrate", "load", "Calibration", "predict_latency", "Prediction",
           "PredictedRow", "record", "replay", "profile", "measure", "Op", "TensorSpec"]
