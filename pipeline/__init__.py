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
# The libraries are frozen as soon as they are imported (`freeze_imported`, from load_base), so
# that one collection walks only the model and tokenizer loaded after them.
STAGE_PROCESS = sys.argv[:1] == ["-m"]
if STAGE_PROCESS:
    gc.disable()
    atexit.register(gc.freeze)


def freeze_imported() -> None:
    """In a stage process, set everything created so far (the imported libraries: ~700k objects
    in evaluate once transformers' modeling code is in) aside from the cyclic GC without walking
    it: the collection before the measured section then walks only what was loaded since, the
    model and tokenizer (~40k objects: 0.01 instead of 0.43 s of CPU in evaluate). The cycles the
    imports left behind (~11k small objects, ~1 MiB) stay; collecting them would mean walking
    all the rest."""
    if STAGE_PROCESS:
        gc.freeze()
