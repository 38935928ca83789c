"""Loading torch pickles that ``torch.load(weights_only=True)`` refused, without running code.

A torch checkpoint (zip archive or the older single-pickle format) is a pickle whose
GLOBAL opcodes name the callables that rebuild the objects; an ordinary unpickler
imports and calls whatever they name, which is how a malicious file runs code. Here the
pickle goes through ``torch.load`` with an unpickler whose ``find_class`` returns only
the few callables that rebuild tensors and parameters (and OrderedDict, dtypes, sizes);
storages are handled by torch's own loader, which reads raw bytes. Any other global, be
it ``os.system``, ``builtins.eval`` or a model class, stops the load with a
``CheckpointError`` naming it, before anything is called.

With current torch every released checkpoint this package knows (E-RFDN ``.pth``, the
FDIWN ``.pt`` pickles saved on CUDA and their ``*_state.pth`` copies) already loads with
``weights_only=True`` and ``map_location="cpu"``; ``checkpoint.read_state_dict`` uses this
module only when that fails. It then gives the same tensors for what ``weights_only``
rejects only out of version differences in its allow-list, and otherwise a clear reason:
the forbidden object's name, a truncated archive, a file that is no torch pickle.
The legacy tar format (torch < 0.4) is refused outright: its loader extracts archive
members to disk.
"""
from __future__ import annotations

import _compat_pickle
import collections
import pickle
import tarfile
import types
from pathlib import Path

import torch
import torch._utils

from ..checkpoint import CheckpointError, _describe_load_error

__all__ = ["load_restricted", "ALLOWED_GLOBALS"]

ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
}
ALLOWED_GLOBALS.update({("torch", str(d).split(".")[1]): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)})


class _Refused(pickle.UnpicklingError):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class _RestrictedUnpickler(pickle.Unpickler):
    # torch.load subclasses this and resolves "...Storage" names itself (to storage
    # types, which hold no code); every other name comes here.
    def find_class(self, module: str, name: str):
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)  # Python 2 names (protocol 2)
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"{module}.{name}") from None


def _load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


# what torch.load expects of a ``pickle_module``
_restricted_pickle = types.ModuleType("distillsr_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = _load
_restricted_pickle.UnpicklingError = pickle.UnpicklingError


def load_restricted(path, first_error: Exception):
    """Unpickle the torch file ``path`` allowing only tensor reconstruction.

    ``first_error`` is why ``weights_only`` loading failed; it is chained to the error
    raised here. Returns the unpickled object (normally a dict of tensors); raises
    ``CheckpointError``.
    """
    path = Path(path)
    if tarfile.is_tarfile(path):
        raise CheckpointError(f"{path}: legacy tar-format torch checkpoint (torch < 0.4); not supported, "
                              "re-save it with a current torch as a state dict")
    try:
        return torch.load(str(path), map_location="cpu", pickle_module=_restricted_pickle,
                          weights_only=False)
    except _Refused as e:
        raise CheckpointError(
            f"{path}: not loaded: the pickle needs '{e.what}', which is not a tensor; only tensors and "
            "plain containers are read from torch files, no code from a checkpoint is run "
            "(save the model's state_dict, or use safetensors)") from first_error
    except CheckpointError:
        raise
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        if isinstance(e, (EOFError, pickle.UnpicklingError)) and "truncated" in str(e):
            raise CheckpointError(f"{path}: cannot load checkpoint: truncated file ({e})") from first_error
        raise _describe_load_error(path, e) from first_error
