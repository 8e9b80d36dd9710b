# Triton kernel bodies are tested on the CPU through the interpreter, which reads this
# variable when triton is first imported: it must be set before anything imports it.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

# Property tests stay small and unhurried: a 2-core CI box, and shapes that vary per example.
settings.register_profile("g2tr", max_examples=30, deadline=None, print_blob=True)
settings.register_profile("g2tr-thorough", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("G2TR_HYPOTHESIS_PROFILE", "g2tr"))

# The backends every op test runs on are the (backend, device) parametrisations of
# helpers.py: backend_device (the oracle and every kernel, Triton under the interpreter on
# the CPU) and kernel_device (the kernels on the SHAPES.md geometries).
