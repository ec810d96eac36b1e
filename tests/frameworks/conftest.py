"""Framework adapter tests: each module importorskips its framework; Keras runs on the torch backend."""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")
