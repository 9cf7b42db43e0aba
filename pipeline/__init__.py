"""Glue shared by the DVC stage scripts: data readers, schemas, metrics, base-model loading."""

import atexit
import gc
import sys

# Run as a stage (`python -m pipeline.<stage>`; sys.argv[0] is "-m" while the module is located):
# a short-lived process whose start-up creates ~400k long-lived objects (torch, transformers,
# mlflow, the model). The cyclic GC would walk them again and again while they load (~1 s of
# CPU per stage) and once more at exit (~1 s). So collection is off until the model is loaded
# (runtime.release_free_memory collects once, freezes the survivors and turns it back on), and
# at exit the survivors are frozen, which the interpreter's last collection then skips.
STAGE_PROCESS = sys.argv[:1] == ["-m"]
if STAGE_PROCESS:
    gc.disable()
    atexit.register(gc.freeze)
