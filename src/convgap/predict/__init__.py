"""Latency prediction: a model's latency on this device from its operators' shapes,
calibrated by micro-benchmarks of random networks on the device (:func:`calibrate`),
without running the model (:func:`predict_latency`). Seconds throughout."""

from .calibration import Calibration, calibrate, load
from .latency import PredictedRow, Prediction, predict_latency
from .record import Op, TensorSpec, record, replay

__all__ = ["calibrate", "load", "Calibration", "predict_latency", "Prediction",
           "PredictedRow", "record", "replay", "Op", "TensorSpec"]
