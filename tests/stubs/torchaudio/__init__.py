"""An import stub for torchaudio, put on PYTHONPATH by `make test-upstream` only.

torchaudio has no wheel for torch 2.14.1, the torch the tests run on. Upstream ComfyUI imports it
at module level on the image path (comfy/sd.py imports the LTX audio VAE and the Gemma 4 text
encoder, which import torchaudio) but calls it only for audio. With this stub those imports
succeed; any use of torchaudio raises an AttributeError that says why, so no audio code runs
on a fake.
"""
from . import functional, transforms
from ._missing import missing_in

__getattr__ = missing_in(__name__)
